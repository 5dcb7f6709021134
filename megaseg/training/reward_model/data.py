"""The data phase of train-rm: tokenizer and chat template -> train/eval pairs -> segment ends of every answer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseg.config import MegasegConfig
from megaseg.data.encoding import EncodedPairs
from megaseg.data.rendering import ChatTemplateRenderer
from megaseg.data.splits import load_preference_splits
from megaseg.data.tokenizer import load_tokenizer, padding_token_id
from megaseg.training.reward_model.batches import SegmentedPair
from megaseg.training.reward_model.segments import segment_pairs


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


def load_reward_model_data(config: MegasegConfig, parallel_ctx) -> RewardModelData:
    """Every rank loads the same splits (small next to the model) and the same segment ends."""
    if config.model.tokenizer is None:
        raise ValueError("model.tokenizer is not set; point it at the model's tokenizer directory or GGUF file "
                         "(a converted checkpoint's megaseg_model.yaml sets it)")
    tokenizer = load_tokenizer(config.model.tokenizer)
    if len(tokenizer) > config.model.vocab_size:
        raise ValueError(f"the tokenizer at model.tokenizer={config.model.tokenizer!r} has {len(tokenizer)} tokens but "
                         f"model.vocab_size={config.model.vocab_size}; use the tokenizer of this model")
    renderer = ChatTemplateRenderer(tokenizer, config.model.eos_token_ids)
    train, evaluation = load_preference_splits(config.data, renderer, seed=config.seed)
    train_pairs = segment_pairs(config, train.pairs, parallel_ctx)
    eval_pairs = segment_pairs(config, evaluation.pairs, parallel_ctx) if evaluation else None
    return RewardModelData(train=train_pairs, eval=eval_pairs, pad_id=padding_token_id(tokenizer),
                           train_encoding=train, eval_encoding=evaluation)
