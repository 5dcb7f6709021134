"""TP=2, PP=2 and DP=2 (spawned gloo ranks) against the dense single-process run of the same tiny model:
reward-model values per position, the LM's vocab-parallel entropies and log-probs, and one optimizer step of the
segment Bradley-Terry loss. The single-process run is itself checked against dense torch: full-vocabulary entropies
from the gathered logits and a torch.optim.AdamW step with torch's gradient clipping on a plain copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from megaseg.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

NUM_PAIRS, SEQ, VOCAB = 4, 32, 128
SEED = 1234
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
OPTIMIZER = dict(lr=1e-3, warmup_ratio=0.0, weight_decay=0.1, grad_clip=0.05)


@dataclass(frozen=True)
class PairMicroBatch:
    """Chosen rows first, then the rejected rows of the same pairs (one batch, as the paper trains)."""

    input_ids: torch.Tensor  # [2 * pairs, seq]
    position_ids: torch.Tensor  # [2 * pairs, seq]
    segment_ends: torch.Tensor  # [2 * pairs, seq] bool
    attention_mask: Optional[torch.Tensor] = None


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2 * NUM_PAIRS, SEQ), generator=generator)
    ends = torch.rand(2 * NUM_PAIRS, SEQ, generator=generator) < 0.25
    ends[:, -1] = True  # every row needs a segment
    return input_ids, ends


def _positions(rows: int) -> torch.Tensor:
    return torch.arange(SEQ).expand(rows, SEQ).contiguous()


def _pair_micro_batches(pair_ids: list[int], num_micro_batches: int) -> list[PairMicroBatch]:
    input_ids, ends = _global_batch()
    per = len(pair_ids) // num_micro_batches
    batches = []
    for index in range(num_micro_batches):
        pairs = pair_ids[index * per:(index + 1) * per]
        rows = pairs + [NUM_PAIRS + pair for pair in pairs]
        batches.append(PairMicroBatch(input_ids[rows], _positions(len(rows)), ends[rows]))
    return batches


def segment_bt_loss(values: torch.Tensor, batch: PairMicroBatch):
    from megaseg.algorithms.aggregation import bradley_terry_loss, mean_segment_reward

    scores = mean_segment_reward(values, batch.segment_ends)
    pairs = scores.shape[0] // 2
    loss = bradley_terry_loss(scores[:pairs], scores[pairs:])
    return loss, {"loss": loss.detach().clone()}


def _lm_outputs(model, ctx):
    from megaseg.models.pipeline import MicroBatch, forward_only
    from megaseg.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs

    input_ids, _ = _global_batch()

    def entropies_and_log_probs(logits, batch):
        # logits[:, j] predicts token j + 1.
        return (vocab_parallel_entropy(logits, ctx.tp_group),
                vocab_parallel_log_probs(logits[:, :-1], batch.input_ids[:, 1:], ctx.tp_group))

    halves = [MicroBatch(input_ids[rows], _positions(NUM_PAIRS)) for rows in (slice(0, 4), slice(4, 8))]
    outputs = forward_only(model, halves, entropies_and_log_probs)
    if not outputs:
        return None
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def _rm_values(model):
    from megaseg.models.pipeline import MicroBatch, forward_only

    input_ids, _ = _global_batch()
    halves = [MicroBatch(input_ids[rows], _positions(NUM_PAIRS)) for rows in (slice(0, 4), slice(4, 8))]
    outputs = forward_only(model, halves)
    return torch.cat(outputs) if outputs else None


def _dense_checks(rm, lm, plain) -> dict:
    """Single process only: the same quantities from dense torch code, independent of megatron's pipeline,
    DDP and optimizer."""
    from megaseg.algorithms.aggregation import bradley_terry_loss, mean_segment_reward
    from megaseg.algorithms.entropy import token_entropy, token_log_probs

    input_ids, ends = _global_batch()
    with torch.no_grad():
        logits = lm(input_ids, _positions(2 * NUM_PAIRS), None)  # [batch, seq, vocab] at TP=1
        # The reward model's backbone is GPTModel's minus the output layer: with the LM's weights and one row of the
        # (tied) unembedding as its head, its values are that token's logits.
        backbone = {key: value for key, value in lm.state_dict().items() if key in plain.state_dict()}
        plain.load_state_dict({**backbone, "head.weight": lm.embedding.word_embeddings.weight[5:6]})
        head_as_token_5 = plain(input_ids, _positions(2 * NUM_PAIRS), None)
    plain.load_state_dict(rm.state_dict())
    scores = mean_segment_reward(plain(input_ids, _positions(2 * NUM_PAIRS), None), ends)
    loss = bradley_terry_loss(scores[:NUM_PAIRS], scores[NUM_PAIRS:])
    loss.backward()
    params = list(plain.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, OPTIMIZER["grad_clip"])
    # megatron's rule: no weight decay on 1-D parameters (norm weights) and biases.
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": OPTIMIZER["weight_decay"]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    torch.optim.AdamW(groups, lr=OPTIMIZER["lr"], betas=(0.9, 0.95), eps=1e-8).step()
    return {
        "token_5_logits": logits[..., 5],
        "head_as_token_5": head_as_token_5,
        "entropy": token_entropy(logits),
        "log_probs": token_log_probs(logits[:, :-1], input_ids[:, 1:]),
        "loss": float(loss),
        "grad_norm": float(grad_norm),
        "params_after_step": {name: p.detach().clone() for name, p in plain.named_parameters()},
    }


def _run_layout(rank, world_size, tp, pp, workdir):
    from megaseg.config.model import ModelConfig
    from megaseg.config.parallel import ParallelConfig
    from megaseg.config.training import OptimizerConfig
    from megaseg.models import build_gpt_model, build_reward_model, forward_backward
    from megaseg.parallel import initialize_parallel
    from megaseg.training.common.optimizer import setup_training
    from models_dense_state import dense_state_dict, load_dense_state

    parallel_cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = initialize_parallel(parallel_cfg, seed=SEED)
    model_cfg = ModelConfig()
    rm = build_reward_model(model_cfg, parallel_cfg, seed=7)
    lm = build_gpt_model(model_cfg, parallel_cfg)
    reference_files = {"rm": Path(workdir) / "rm_init.pt", "lm": Path(workdir) / "lm_init.pt"}
    if pp > 1:  # pipeline stages draw their init from other RNG streams: start from the dense weights
        load_dense_state(rm, torch.load(reference_files["rm"]))
        load_dense_state(lm, torch.load(reference_files["lm"]))
    result = {"rm_init": dense_state_dict(rm), "rm_values": _rm_values(rm), "lm": _lm_outputs(lm, ctx)}
    if world_size == 1:
        torch.save(result["rm_init"], reference_files["rm"])
        torch.save(dense_state_dict(lm), reference_files["lm"])
        result["dense"] = _dense_checks(rm, lm, plain=build_reward_model(model_cfg, parallel_cfg, seed=7))

    training = setup_training(rm, OptimizerConfig(**OPTIMIZER), total_steps=4)
    pairs_per_rank = NUM_PAIRS // ctx.dp_size
    my_pairs = list(range(ctx.dp_rank * pairs_per_rank, (ctx.dp_rank + 1) * pairs_per_rank))
    training.zero_grads()
    metrics = forward_backward(training.model, _pair_micro_batches(my_pairs, pairs_per_rank // 2), segment_bt_loss)
    step = training.step()
    result.update(losses=[float(m["loss"]) for m in metrics], grad_norm=step.grad_norm,
                  rm_after_step=dense_state_dict(rm), dp_rank=ctx.dp_rank, pp_rank=ctx.pp_rank)
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def reference(workdir):
    (result,) = run_distributed(_run_layout, 1, 1, 1, workdir)
    return result


@pytest.fixture(scope="module")
def layouts(reference, workdir):
    # The reference run writes the dense initial weights that the pipeline-parallel run starts from.
    return {name: run_distributed(_run_layout, 2, tp, pp, workdir)
            for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}.items()}


def _merged(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        merged.update(result[key])
    return merged


def _global_loss(results: list[dict]) -> float:
    """Mean of the micro-batch losses of one rank per data-parallel replica (micro-batches hold equally many
    pairs, so this is the mean over the global batch)."""
    last_stage = max(r["pp_rank"] for r in results)
    per_replica = {r["dp_rank"]: r["losses"] for r in results if r["pp_rank"] == last_stage}
    losses = [loss for replica in per_replica.values() for loss in replica]
    return sum(losses) / len(losses)


def _last_stage(results: list[dict]) -> dict:
    return max(results, key=lambda r: r["pp_rank"])


def test_single_process_matches_dense_torch(reference):
    dense = reference["dense"]
    entropy, log_probs = reference["lm"]
    torch.testing.assert_close(entropy, dense["entropy"], **TOLERANCE)
    torch.testing.assert_close(log_probs, dense["log_probs"], **TOLERANCE)
    assert _global_loss([reference]) == pytest.approx(dense["loss"], rel=1e-5)
    assert reference["grad_norm"] == pytest.approx(dense["grad_norm"], rel=1e-5)
    assert reference["grad_norm"] > OPTIMIZER["grad_clip"], "the test should exercise clipping"
    after = reference["rm_after_step"]
    assert after.keys() == dense["params_after_step"].keys()
    for name, value in dense["params_after_step"].items():
        torch.testing.assert_close(after[name], value, **TOLERANCE, msg=lambda details, name=name: f"{name}: {details}")
        assert not torch.equal(after[name], reference["rm_init"][name]), f"{name} did not move"


def test_reward_backbone_is_the_language_models(reference):
    dense = reference["dense"]
    torch.testing.assert_close(dense["head_as_token_5"], dense["token_5_logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # the three two-rank layouts take ~30 s together on 2 idle cores
def test_tensor_parallel_init_is_the_dense_init(reference, layouts):
    for result in layouts["tp2"]:
        assert result["rm_init"].keys() == reference["rm_init"].keys()
        for name, value in reference["rm_init"].items():
            assert torch.equal(result["rm_init"][name], value), name


@pytest.mark.slow  # the three two-rank layouts take ~30 s together on 2 idle cores
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_reward_values_match_single_process(reference, layouts, layout):
    last = _last_stage(layouts[layout])
    assert last["rm_values"].shape == (2 * NUM_PAIRS, SEQ)
    torch.testing.assert_close(last["rm_values"], reference["rm_values"], **TOLERANCE)
    if layout == "pp2":
        assert min(layouts[layout], key=lambda r: r["pp_rank"])["rm_values"] is None  # only the last stage gets them


@pytest.mark.slow  # the three two-rank layouts take ~30 s together on 2 idle cores
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_lm_entropy_and_log_probs_match_single_process(reference, layouts, layout):
    entropy, log_probs = _last_stage(layouts[layout])["lm"]
    torch.testing.assert_close(entropy, reference["lm"][0], **TOLERANCE)
    torch.testing.assert_close(log_probs, reference["lm"][1], **TOLERANCE)


@pytest.mark.slow  # the three two-rank layouts take ~30 s together on 2 idle cores
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_one_optimizer_step_matches_single_process(reference, layouts, layout):
    results = layouts[layout]
    after = _merged(results, "rm_after_step")
    assert after.keys() == reference["rm_after_step"].keys()
    for name, value in reference["rm_after_step"].items():
        torch.testing.assert_close(after[name], value, **TOLERANCE, msg=lambda details, name=name: f"{name}: {details}")
    for result in results:
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert _global_loss(results) == pytest.approx(_global_loss([reference]), rel=1e-5)
