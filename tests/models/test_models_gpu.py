"""GPU-only: the TransformerEngine layer spec (picked by transformer_impl=auto), weights moved between the local and
TE specs through a checkpoint, FP8 (checked to be active in the forward, and one training step against bf16), and
sequence parallelism (two GPUs). Skipped on CPU (`-m "not gpu"` is the
default in pytest.ini); run with `pytest -m gpu tests/models`."""
from __future__ import annotations

import contextlib
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


def _fp8_activity(model) -> dict:
    """How many TransformerEngine modules ran their last forward in FP8, and the sum of their forward amax histories
    (delayed scaling records every FP8 GEMM input's amax there; 0 means no FP8 cast happened)."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    modules = [m for m in model.modules() if isinstance(m, TransformerEngineBaseModule)]
    amax = 0.0
    for module in modules:
        scaling = getattr(module, "fp8_meta", {}).get("scaling_fwd")
        if scaling is not None and hasattr(scaling, "amax_history"):
            amax += float(scaling.amax_history.float().abs().sum())
    return {"te_modules": len(modules), "fp8_modules": sum(bool(getattr(m, "fp8", False)) for m in modules),
            "amax_sum": amax}


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
        activity = _fp8_activity(te_model)
    # TE's extra state (FP8 scaling metadata) is unexpected for the local layers and skipped on load.
    save_model_state(Path(root) / "state", model=te_model, model_cfg=config.model)
    local_cfg = dataclasses.replace(config.model, transformer_impl="local", fp8=None)
    local = build_reward_model(local_cfg, config.parallel, seed=7).cuda()
    load_model_state(Path(root) / "state", model=local, model_cfg=local_cfg)
    return impl, _values(local), te_values, activity if fp8 else None


def test_te_spec_weights_load_into_the_local_spec_and_agree(tmp_path):
    _require_te()
    impl, expected, actual, _ = run_distributed(_te_then_local, 1, str(tmp_path), None)[0]
    assert impl == "transformer_engine"
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fp8_forward_is_close_to_full_precision(tmp_path):
    _require_te()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada / Hopper or newer")
    _, expected, actual, activity = run_distributed(_te_then_local, 1, str(tmp_path), "hybrid")[0]
    # FP8 was really on: TE modules ran their forward in FP8 and recorded amaxes (not only "close to bf16").
    assert activity["te_modules"] > 0, activity
    assert activity["fp8_modules"] > 0, f"no TransformerEngine module ran in FP8: {activity}"
    assert activity["amax_sum"] > 0, f"FP8 amax histories are all zero (no FP8 cast happened): {activity}"
    assert torch.isfinite(actual).all()
    # FP8 keeps ~2 significant digits per GEMM; the tiny model's values stay within a loose band.
    assert (actual - expected).abs().max() < 0.1 * expected.abs().max() + 0.05


def _training_step(rank, world_size, fp8):
    """One SGD step of the TE reward model in bf16, with or without FP8: (loss before, loss after, the flattened
    gradient, FP8 activity)."""
    from megatron.core.fp8_utils import get_fp8_context

    from megaseg.models import build_reward_model
    from megaseg.parallel import initialize_parallel

    overrides = ["model.transformer_impl=transformer_engine", "model.params_dtype=bfloat16"]
    config = load_config(None, overrides + ([f"model.fp8={fp8}"] if fp8 else []))
    initialize_parallel(config.parallel, seed=1, fp8=fp8)
    model = build_reward_model(config.model, config.parallel, seed=7).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    input_ids, position_ids = _inputs()
    target = torch.linspace(-1, 1, SEQ, device="cuda").expand(4, SEQ)

    def loss_fn():
        with get_fp8_context(model.config) if fp8 else contextlib.nullcontext():
            values = model(input_ids, position_ids, None).float()
        return (values - target).pow(2).mean()

    loss = loss_fn()
    loss.backward()
    grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]).cpu()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = loss_fn()
    return float(loss), float(after), grad, _fp8_activity(model) if fp8 else None


def test_fp8_training_step_tracks_the_bf16_step():
    """Tolerance: the loss before and after one step within 5% (relative) of bf16's, the gradients' cosine
    similarity >= 0.95 and norms within 10%: FP8 (e4m3 forward, e5m2 backward) rounds ~1 digit coarser than bf16."""
    _require_te()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada / Hopper or newer")
    bf16_loss, bf16_after, bf16_grad, _ = run_distributed(_training_step, 1, None)[0]
    fp8_loss, fp8_after, fp8_grad, activity = run_distributed(_training_step, 1, "hybrid")[0]
    assert activity["fp8_modules"] > 0 and activity["amax_sum"] > 0, f"FP8 was not active: {activity}"
    assert bf16_after < bf16_loss, "the bf16 step did not reduce the loss: the comparison would mean nothing"
    assert abs(fp8_loss - bf16_loss) <= 0.05 * abs(bf16_loss), (fp8_loss, bf16_loss)
    assert abs(fp8_after - bf16_after) <= 0.05 * abs(bf16_after), (fp8_after, bf16_after)
    cosine = torch.nn.functional.cosine_similarity(fp8_grad, bf16_grad, dim=0)
    assert cosine >= 0.95, f"gradient cosine similarity {float(cosine):.4f}"
    assert abs(fp8_grad.norm() - bf16_grad.norm()) <= 0.1 * bf16_grad.norm()


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
