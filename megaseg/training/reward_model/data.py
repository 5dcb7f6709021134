"""The data phase of train-rm: tokenizer and chat template -> train/eval pairs -> segment ends of every answer.

Segment ends come from the segmentation cache (``megaseg.segmentation.segment_ends_for``, the `megaseg segment`
machinery): for entropy segmentation it runs the frozen SFT model once over the data, so a second train-rm run on
the same data (another lr, the bandit baseline after the segment RM, a resumed run) reads the ends back.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from megaseg.config import MegasegConfig
from megaseg.data.encoding import EncodedPairs, TokenizedPair
from megaseg.data.rendering import ChatTemplateRenderer
from megaseg.data.splits import load_preference_splits
from megaseg.data.tokenizer import load_tokenizer, padding_token_id
from megaseg.parallel.initialize import ParallelContext


@dataclass(frozen=True)
class SegmentedPair:
    """A tokenized pair with the segment ends of both answers, as positions in each answer's prompt+response ids
    (position 0 = first prompt token: the columns of a right-padded batch; the segmentation cache's convention)."""

    pair: TokenizedPair
    chosen_ends: tuple[int, ...]    # [T_chosen], ascending, on response tokens
    rejected_ends: tuple[int, ...]  # [T_rejected]

    def __post_init__(self) -> None:
        for name, ends, sequence in (("chosen", self.chosen_ends, self.pair.chosen),
                                     ("rejected", self.rejected_ends, self.pair.rejected)):
            start, stop = len(sequence.prompt_ids), len(sequence.prompt_ids) + len(sequence.response_ids)
            if not ends or min(ends) < start or max(ends) >= stop:
                raise ValueError(f"{self.pair.source}: {name} segment ends {list(ends)[:8]} must be non-empty "
                                 f"positions of its response tokens [{start}, {stop}); the segmentation does not "
                                 "match this data (delete its cache entry and segment again)")

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens of both answers (what a forward pass over the pair processes)."""
        return sum(len(s.prompt_ids) + len(s.response_ids) for s in (self.pair.chosen, self.pair.rejected))


def segment_pairs(config: MegasegConfig, pairs: Sequence[TokenizedPair],
                  parallel_ctx: ParallelContext, capture: Any = None) -> list[SegmentedPair]:
    """SegmentedPairs for `pairs` under config.segmentation (collective: every rank calls it, all get all pairs);
    ``capture``: fed by the entropy pass, if one runs (megaseg.segmentation.segment_ends_for)."""
    from megaseg.segmentation import segment_ends_for

    segmented = segment_ends_for(config, list(pairs), parallel_ctx, capture=capture)
    if segmented.num_pairs != len(pairs):
        raise ValueError(f"the segmentation returned ends for {segmented.num_pairs} pairs, not {len(pairs)}; its "
                         f"cache entry {segmented.cache_entry} belongs to other data: delete it and segment again")
    result = []
    for index, pair in enumerate(pairs):
        chosen, rejected = segmented.ends_for_pair(index)
        result.append(SegmentedPair(pair, tuple(int(p) for p in chosen), tuple(int(p) for p in rejected)))
    return result


@dataclass(frozen=True)
class RewardModelData:
    train: list[SegmentedPair]
    eval: Optional[list[SegmentedPair]]
    pad_id: int
    train_encoding: EncodedPairs   # skip and truncation counts, for the log
    eval_encoding: Optional[EncodedPairs]

    def describe(self) -> str:
        lines = []
        for name, pairs, encoding in (("train", self.train, self.train_encoding),
                                      ("eval", self.eval, self.eval_encoding)):
            if pairs is None:
                lines.append(f"{name}: none (set data.eval_path or data.eval_fraction for validation)")
                continue
            responses = [ends for item in pairs for ends in (item.chosen_ends, item.rejected_ends)]
            num_segments = sum(len(ends) for ends in responses)
            # Tokens from the response start to its last segment end (EOS after the last segment is not counted).
            covered = sum(ends[-1] + 1 - len(sequence.prompt_ids) for item in pairs
                          for ends, sequence in ((item.chosen_ends, item.pair.chosen),
                                                 (item.rejected_ends, item.pair.rejected)))
            lines.append(
                f"{name}: {len(pairs)} pairs ({encoding.skipped.summary()}; "
                f"{encoding.truncation.num_prompts_truncated} prompts and "
                f"{encoding.truncation.num_responses_truncated} responses truncated); "
                f"{num_segments / len(responses):.1f} segments per response, mean segment length "
                f"{covered / max(num_segments, 1):.1f} tokens")
        return "\n".join(lines)


def load_reward_model_data(config: MegasegConfig, parallel_ctx: ParallelContext,
                           prefix_features: Any = None) -> RewardModelData:
    """Every rank loads the same splits (small next to the model) and the same segment ends. ``prefix_features``:
    a megaseg.training.reward_model.frozen_prefix.PrefixFeatures the entropy pass, if one runs, fills."""
    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; point it at the model's tokenizer directory or GGUF file "
                         "(a converted checkpoint's megaseg_model.yaml sets it)")
    tokenizer = load_tokenizer(config.model.tokenizer)
    if len(tokenizer) > config.model.vocab_size:
        raise ValueError(f"the tokenizer at model.tokenizer={config.model.tokenizer!r} has {len(tokenizer)} tokens but "
                         f"model.vocab_size={config.model.vocab_size}; use the tokenizer of this model")
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    train, evaluation = load_preference_splits(config.data, renderer, seed=config.seed)
    capture = prefix_features.entropy_capture() if prefix_features is not None else None
    train_pairs = segment_pairs(config, train.pairs, parallel_ctx, capture)
    eval_pairs = segment_pairs(config, evaluation.pairs, parallel_ctx, capture) if evaluation else None
    return RewardModelData(train=train_pairs, eval=eval_pairs, pad_id=padding_token_id(tokenizer),
                           train_encoding=train, eval_encoding=evaluation)
