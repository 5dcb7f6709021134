"""The LR schedule against the formula (linear warm-up, then cosine / linear / constant to min_lr_ratio * lr), and
freezing all but the top layers under pipeline parallelism (a stage with nothing to train still steps)."""
from __future__ import annotations

import math

import pytest
import torch

from megaseg.config.training import OptimizerConfig
from megaseg.parallel.spawn import run_distributed
from megaseg.training.common.optimizer import build_lr_scheduler, num_warmup_steps


def expected_lr(step: int, cfg: OptimizerConfig, total: int) -> float:
    """OpenRLHF / HF `cosine_with_min_lr` (and the linear / constant variants), written from the definition."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * step / warmup
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = (step - warmup) / (total - warmup)
    if cfg.scheduler == "constant":
        return cfg.lr
    if cfg.scheduler == "linear":
        return min_lr + (cfg.lr - min_lr) * (1 - progress)
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_the_formula(scheduler):
    cfg = OptimizerConfig(lr=1e-5, min_lr_ratio=0.1, warmup_ratio=0.1, scheduler=scheduler, weight_decay=0.01)
    total = 50
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    schedule = build_lr_scheduler(optimizer, cfg, total)
    seen = []
    for step in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr the (step + 1)-th update would use
        schedule.step(1)
    assert seen == pytest.approx([expected_lr(step, cfg, total) for step in range(total + 1)], rel=1e-9, abs=1e-15)
    assert seen[0] == 0.0 and seen[5] == pytest.approx(cfg.lr)
    assert optimizer.param_groups[0]["weight_decay"] == cfg.weight_decay


def test_warmup_rounding():
    assert num_warmup_steps(OptimizerConfig(warmup_ratio=0.03), 100) == 3
    assert num_warmup_steps(OptimizerConfig(warmup_ratio=0.03), 10) == 1  # ceil, as OpenRLHF
    assert num_warmup_steps(OptimizerConfig(warmup_ratio=0.0), 10) == 0
    with pytest.warns(UserWarning, match=r"warmup_ratio=0.5 covers all 1 steps"):
        assert num_warmup_steps(OptimizerConfig(warmup_ratio=0.5), 1) == 0
    with pytest.raises(ValueError, match=r"total_steps=0 must be >= 1"):
        build_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), OptimizerConfig(), 0)


def _train_top_layer_at_pp2(rank, world_size):
    from megaseg.config.model import ModelConfig
    from megaseg.config.parallel import ParallelConfig
    from megaseg.models import MicroBatch, build_reward_model, forward_backward
    from megaseg.parallel import initialize_parallel
    from megaseg.training.common.optimizer import freeze_all_but_top_layers, setup_training

    parallel_cfg = ParallelConfig(pipeline_model_parallel_size=2)
    initialize_parallel(parallel_cfg, seed=3)
    model = build_reward_model(ModelConfig(), parallel_cfg, seed=7)
    try:
        freeze_all_but_top_layers(model, 3)
        bad_value_error = None
    except ValueError as error:
        bad_value_error = str(error)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    training = setup_training(model, OptimizerConfig(lr=1e-2, warmup_ratio=0.0), total_steps=2, train_top_layers=1)
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = [MicroBatch(input_ids, torch.arange(16).expand(2, 16))] * 2
    training.zero_grads()
    forward_backward(training.model, batches, lambda values, batch: (values.mean(), {}))
    step = training.step()
    moved = {name: not torch.equal(before[name], param) for name, param in model.named_parameters()}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return bad_value_error, step.updated, moved, trainable


@pytest.mark.distributed
def test_freezing_all_but_the_top_layer_under_pipeline_parallelism():
    first, last = run_distributed(_train_top_layer_at_pp2, 2)
    assert first[0] == "rm.train_top_layers=3 must lie in [1, model.num_layers=2]"
    # Stage 0 holds the embedding and layer 1 of 2: nothing to train, and it must still take part in the step.
    assert first[1] and first[3] == set() and not any(first[2].values())
    # Stage 1 holds layer 2 (the top one), the final norm and the head: all trained.
    assert last[1] and all(last[2].values())
    assert last[3] == set(last[2]) and "head.weight" in last[3] and "decoder.final_layernorm.weight" in last[3]
