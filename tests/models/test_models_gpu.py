"""GPU-only: the TransformerEngine layer spec (picked by transformer_impl=auto), weights moved between the local and
TE specs through a checkpoint, FP8, and sequence parallelism (two GPUs). Skipped on CPU (`-m "not gpu"` is the
default in pytest.ini); run with `pytest -m gpu tests/models`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megaseg.config import load_config
from megaseg.parallel.spawn import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]

SEQ = 32


def _require_te():
    from megaseg.models.backend import transformer_engine_importable

    if not (torch.cuda.is_available() and transformer_engine_importable()):
        pytest.skip("needs a CUDA GPU with transformer_engine installed")


def _inputs():
    input_ids = torch.randint(0, 128, (4, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    return input_ids, torch.arange(SEQ, device="cuda").expand(4, SEQ).contiguous()


def _values(model):
    with torch.no_grad():
        return model(*_inputs(), None).float().cpu()


def _te_then_local(rank, world_size, root, fp8):
    from megaseg.models import build_reward_model
    from megaseg.models.backend import resolve_transformer_impl
    from megaseg.parallel import initialize_parallel
    from megaseg.checkpoint.step_dirs import load_model_state, save_model_state

    # Exact fp32 GEMMs in both specs, so that the comparison measures the layer implementations only.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = load_config(None, ["model.transformer_impl=auto"] + ([f"model.fp8={fp8}"] if fp8 else []))
    initialize_parallel(config.parallel, seed=1, fp8=fp8)
    impl = resolve_transformer_impl(config.model)
    te_model = build_reward_model(config.model, config.parallel, seed=7).cuda()
    if fp8 is None:
        te_values = _values(te_model)
    else:
        from megatron.core.fp8_utils import get_fp8_context

        with get_fp8_context(te_model.config):
            te_values = _values(te_model)
    # TE's extra state (FP8 scaling metadata) is unexpected for the local layers and skipped on load.
    save_model_state(Path(root) / "state", model=te_model, model_cfg=config.model)
    local_cfg = dataclasses.replace(config.model, transformer_impl="local", fp8=None)
    local = build_reward_model(local_cfg, config.parallel, seed=7).cuda()
    load_model_state(Path(root) / "state", model=local, model_cfg=local_cfg)
    return impl, _values(local), te_values


def test_te_spec_weights_load_into_the_local_spec_and_agree(tmp_path):
    _require_te()
    impl, expected, actual = run_distributed(_te_then_local, 1, str(tmp_path), None)[0]
    assert impl == "transformer_engine"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fp8_forward_is_close_to_full_precision(tmp_path):
    _require_te()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada / Hopper or newer")
    _, expected, actual = run_distributed(_te_then_local, 1, str(tmp_path), "hybrid")[0]
    assert torch.isfinite(actual).all()
    # FP8 keeps ~2 significant digits per GEMM; the tiny model's values stay within a loose band.
    assert (actual - expected).abs().max() < 0.1 * expected.abs().max() + 0.05


def _sequence_parallel_values(rank, world_size, sequence_parallel):
    from megaseg.models import build_reward_model
    from megaseg.parallel import initialize_parallel

    config = load_config(None, ["parallel.tensor_model_parallel_size=2", "model.transformer_impl=transformer_engine",
                                f"parallel.sequence_parallel={sequence_parallel}"])
    initialize_parallel(config.parallel, seed=1)
    model = build_reward_model(config.model, config.parallel, seed=7).cuda()
    values = model(*_inputs(), None)
    values.sum().backward()
    return values.detach().float().cpu(), model.head.weight.grad.float().cpu()


def test_sequence_parallel_gathers_values_and_reduces_head_grads():
    _require_te()
    if torch.cuda.device_count() < 2:
        pytest.skip("sequence parallelism needs tensor parallelism over two GPUs")
    plain = run_distributed(_sequence_parallel_values, 2, False)[0]
    sequence_parallel, sequence_parallel_rank1 = run_distributed(_sequence_parallel_values, 2, True)
    torch.testing.assert_close(sequence_parallel[0], plain[0], rtol=1e-4, atol=1e-4)
    # Under SP each rank's head sees its slice of the positions, so its gradient is partial; finalize_model_grads
    # all-reduces the gradients of parameters marked sequence_parallel (the head is). Without DDP here: the sum of
    # the two ranks' partial gradients is the whole.
    torch.testing.assert_close(sequence_parallel[1] + sequence_parallel_rank1[1], plain[1], rtol=1e-4, atol=1e-4)
