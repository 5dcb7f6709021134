"""Shared set-up of the reward-model trainer tests: a tiny random model that reads real SmolLM2 token ids, a handful
of the shipped HH-RLHF pairs cut short, and the independent references (n-gram ends by hand, per-pair loss)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from material import smollm2_tokenizer_dir  # noqa: F401  (re-exported for the reward-model tests)
from megaseg.config import MegasegConfig, load_config

NGRAM = 4


def tiny_rm_overrides(tokenizer_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    """A 2-layer, hidden-64 model over SmolLM2's 49,152-token vocabulary (the reward model has no vocab-sized
    output layer, so it stays cheap); 24 pairs, 6 held out; 4 pairs per step in micro-batches of 2."""
    settings = {
        "model.vocab_size": 49152, "model.tokenizer": str(tokenizer_dir),
        "data.train_path": "shipped:hh_rlhf_harmless/pairs.jsonl", "data.max_samples": 24,
        "data.eval_fraction": 0.25, "data.max_length": 64, "data.max_prompt_length": 32,
        "segmentation.mode": "ngram", "segmentation.ngram_size": NGRAM,
        "segmentation.cache_dir": str(out_dir / "segment_cache"),
        "rm.global_batch_size": 4, "rm.micro_batch_size": 2,
        # No warm-up: with megatron's schedule the first step would otherwise run at lr 0 and change nothing.
        "rm.optimizer.lr": 1e-2, "rm.optimizer.warmup_ratio": 0.0,
        "logging.out_dir": str(out_dir), "logging.tensorboard": False, "checkpoint.keep_last": 1,
    }
    settings.update(extra)
    if "model.checkpoint" not in settings:
        settings["model.random_init"] = True  # no SFT model: a random backbone (it only has to be the same everywhere)
    return [f"{key}={value}" for key, value in settings.items()]


def tiny_rm_config(tokenizer_dir: Path, out_dir: Path, **extra: object) -> MegasegConfig:
    return load_config(None, tiny_rm_overrides(tokenizer_dir, out_dir, **extra))


def logged(out_dir: Path, name: str = "train/loss") -> dict[int, float]:
    """{step: value of `name`} from a run's metrics.jsonl (a resumed run appends to the same file)."""
    values = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if name in row:
            values[row["step"]] = row[name]
    return values


def ngram_ends_by_hand(prompt_length: int, response_length: int, ends_with_eos: bool, n: int) -> list[int]:
    """The method's n-gram rule, written out: every n-th content token ends a segment, and the last content token
    (the token before EOS, or the last token of a truncated answer) always does; EOS itself is never scored."""
    num_content = response_length - 1 if ends_with_eos else response_length
    assert num_content > 0
    ends = [k for k in range(num_content) if (k + 1) % n == 0]
    if not ends or ends[-1] != num_content - 1:
        ends.append(num_content - 1)
    return [prompt_length + k for k in ends]


def sequence_score(model, sequence, ends: list[int]) -> torch.Tensor:
    """e(x, y) of one sequence, run alone (no batch, no padding): mean of the head outputs at the segment ends."""
    ids = torch.tensor([list(sequence.prompt_ids) + list(sequence.response_ids)])
    values = model(ids, torch.arange(ids.shape[1])[None], None)[0].float()
    return values[ends].mean()


def pair_loss_by_hand(model, pair) -> tuple[torch.Tensor, bool]:
    """(-log sigmoid(e(chosen) - e(rejected)), chosen scored higher) with n-gram ends computed by hand."""
    scores = []
    for sequence in (pair.chosen, pair.rejected):
        ends = ngram_ends_by_hand(len(sequence.prompt_ids), len(sequence.response_ids), sequence.ends_with_eos, NGRAM)
        scores.append(sequence_score(model, sequence, ends))
    return -F.logsigmoid(scores[0] - scores[1]), bool(scores[0] > scores[1])
