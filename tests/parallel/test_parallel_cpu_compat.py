"""The CPU shim: megatron's GPTModel, its RNG tracker, DDP + optimizer + schedule run on a CPU build of torch.

The shim patches process-wide state, so everything that applies it runs in a fresh spawned process; the pytest
process itself stays unpatched.
"""

import pytest
import torch

from megaseg.parallel.cpu_compat import cuda_device_redirect, is_cpu_only
from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.skipif(not is_cpu_only(), reason="the CPU shim is a no-op on a CUDA machine")

VOCAB, SEQ, BATCH = 64, 16, 2


def _tiny_gpt(dropout: float):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=dropout, attention_dropout=dropout,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        sequence_parallel=False,
    )
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope")
    return config, model


def _batch():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return tokens, torch.arange(SEQ)[None].expand(BATCH, -1)


def _gpt_forward_backward_with_tracker(rank, world_size):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import apply_cpu_compat, initialize_parallel

    context = initialize_parallel(ParallelConfig(), seed=5)
    assert apply_cpu_compat() and apply_cpu_compat(), "apply_cpu_compat must be idempotent"
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()

    _, model = _tiny_gpt(dropout=0.2)
    tokens, positions = _batch()
    # attention_mask=None: DotProductAttention builds its default causal mask (device="cuda" inside megatron).
    logits = model(tokens, positions, attention_mask=None)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB)[:-1], tokens.reshape(-1)[1:])
    loss.backward()
    grads_finite = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    grad_norm = float(sum(p.grad.pow(2).sum() for p in model.parameters()))

    # Dropout inside the tracker's fork is reproducible: restoring the tracker + default states repeats the masks.
    tracker = get_cuda_rng_tracker()
    saved_states, saved_cpu = tracker.get_states(), torch.get_rng_state()
    saved_states = {name: state.clone() for name, state in saved_states.items()}
    first = model(tokens, positions, attention_mask=None).detach()
    tracker.set_states(saved_states)
    torch.set_rng_state(saved_cpu)
    again = model(tokens, positions, attention_mask=None).detach()
    different = model(tokens, positions, attention_mask=None).detach()
    model.eval()
    eval_a = model(tokens, positions, attention_mask=None).detach()
    eval_b = model(tokens, positions, attention_mask=None).detach()
    return {
        "logits_shape": tuple(logits.shape), "loss": float(loss), "grads_finite": grads_finite,
        "grad_norm": grad_norm, "repeat_equal": torch.equal(first, again), "fresh_differs": not torch.equal(first, different),
        "eval_equal": torch.equal(eval_a, eval_b), "tracker_names": sorted(tracker.get_states()),
        "device": str(context.device),
    }


def _ddp_optimizer_schedule_steps(rank, world_size):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaseg.config.parallel import ParallelConfig
    from megaseg.parallel import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=5)
    config, model = _tiny_gpt(dropout=0.0)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=False), model)
    with cuda_device_redirect():
        # clip_grad=0: megatron's clip_grads asserts torch.cuda.FloatTensor grads (see megatron-on-cpu.md).
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0), [model])
    tokens, positions = _batch()

    def forward_step(_data_iterator, step_model):
        per_token_loss = step_model(tokens, positions, attention_mask=None, labels=tokens)
        return per_token_loss, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    losses = []
    for _ in range(4):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        with cuda_device_redirect():
            reports = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=[model], num_microbatches=1,
                seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
            )
            model.finish_grad_sync()
            succeeded, _, _ = optimizer.step()
        assert succeeded
        losses.append(float(reports[0]["loss"]))
    return losses


def test_gpt_forward_backward_and_rng_tracker_on_cpu():
    (result,) = run_distributed(_gpt_forward_backward_with_tracker, 1, timeout=120)
    assert result["logits_shape"] == (BATCH, SEQ, VOCAB)
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert result["grads_finite"] and result["grad_norm"] > 0
    assert result["repeat_equal"], "dropout masks must repeat when the tracker states are restored"
    assert result["fresh_differs"], "dropout must draw new masks as the tracker state advances"
    assert result["eval_equal"]
    assert result["tracker_names"] == ["data-parallel-rng", "expert-parallel-rng", "model-parallel-rng"]
    assert result["device"] == "cpu"


def test_megatron_ddp_optimizer_and_schedule_train_on_cpu():
    (losses,) = run_distributed(_ddp_optimizer_schedule_steps, 1, timeout=120)
    # Megatron DDP puts grads in param.main_grad; only its own optimizer reads them, so a falling loss proves the
    # whole chain (stand-in stream, schedule and optimizer under the redirect) is wired.
    assert losses[-1] < losses[0] - 0.05, losses


def test_cuda_device_redirect_rewrites_cuda_devices_to_cpu():
    with cuda_device_redirect():
        created = [
            torch.zeros(2, device="cuda"),
            torch.ones(2, device="cuda:1"),
            torch.tensor([1.0], device=torch.device("cuda", 0)),
            torch.empty(3, device=0),
            torch.arange(3).cuda(),
            torch.arange(3).to("cuda"),
            torch.arange(3).to(device="cuda:0", dtype=torch.float64),
            torch.zeros(1).new_zeros(4, device="cuda"),
        ]
        made_device = torch.device("cuda", 1)
        sized = torch.zeros(0, 5)  # plain ints are sizes, never devices
    assert all(t.device.type == "cpu" for t in created)
    assert made_device == torch.device("cpu")
    assert created[6].dtype == torch.float64
    assert sized.shape == (0, 5)


def test_cuda_device_redirect_leaves_the_mode_on_exit():
    with cuda_device_redirect():
        pass
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
