"""The frozen-prefix path of train-rm and of scoring: the frozen bottom layers' output of every sequence, computed
once (by the entropy pass where it runs), kept in memory, and only the top N layers + final norm + head run after.

Why it is exact: with rm.train_top_layers = N the reward model's bottom L = num_layers - N layers are the SFT
model's, frozen (megaseg.training.common.optimizer.freeze_all_but_top_layers), so their output for a sequence is a
constant of the run; megaseg.models.frozen_prefix splits the forward there (``top_values(bottom(x)) == model(x)``).
The saved reward model is still the whole model (bottom from SFT + trained top): eval-rm and PPO load it as before.

Where it applies (``frozen_prefix_plan``): rm.frozen_prefix, rm.train_top_layers < model.num_layers, ONE process
(world size 1: at DP > 1 every rank would need the features of every pair its sampler may draw; at PP > 1 the split
crosses stages) and no sequence parallelism; and the features must fit FEATURE_MEMORY_LIMIT_BYTES (past it they are
dropped, ``overflowed``). Otherwise the normal path runs and the log says why.

Features keep the dtype the layers compute in (model.params_dtype: rounding them to anything else would change the
scores), one [length, hidden] tensor per distinct token sequence, keyed by
its token ids: a lookup can only return the hidden states of exactly these tokens, and the chosen and rejected rows
of a micro-batch, the scorer's sorted micro-batches and the entropy pass's all find theirs whatever their order.
They are not written to disk: a resumed run recomputes them (the bottom layers only, when the entropies are cached).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
from typing import Any, Optional

import torch

from megaseg.config import MegasegConfig
from megaseg.data.batch import collate_sequences
from megaseg.data.encoding import TokenizedSequence
from megaseg.models.frozen_prefix import LayerInputCapture, bottom_hidden_states, top_values
from megaseg.models.inference import PAD_ID, InferenceMicroBatch, plan_micro_batches
from megaseg.models.pipeline import forward_backward, packing_of
from megaseg.parallel.initialize import ParallelContext

# fp32 features of ~3.6M tokens at SmolLM2's hidden size 576 (bf16: twice as many); beyond this the normal path runs.
FEATURE_MEMORY_LIMIT_BYTES = 8 * 1024 ** 3


def _tokens(sequence: TokenizedSequence) -> tuple[int, ...]:
    return tuple(sequence.prompt_ids) + tuple(sequence.response_ids)


def frozen_prefix_plan(config: MegasegConfig, parallel_ctx: ParallelContext) -> tuple[Optional[int], str]:
    """(L = the number of frozen bottom layers whose output is kept, or None for the normal path; why, for the log)."""
    rm, model = config.rm, config.model
    if not rm.frozen_prefix:
        return None, "rm.frozen_prefix=false"
    if rm.train_top_layers is None or rm.train_top_layers >= model.num_layers:
        return None, (f"rm.train_top_layers={rm.train_top_layers}: no frozen bottom layers "
                      f"(model.num_layers={model.num_layers})")
    if parallel_ctx.world_size != 1:
        return None, (f"{parallel_ctx.world_size} processes (it runs in one process: at pipeline parallelism the split "
                      "crosses stages, at data parallelism every rank would hold every pair's features)")
    if config.parallel.sequence_parallel:
        return None, "parallel.sequence_parallel=true"
    num_bottom = model.num_layers - rm.train_top_layers
    return num_bottom, (f"layers 0-{num_bottom - 1} are frozen: their output is kept per sequence (in memory) "
                        f"and every training and scoring pass runs the top {rm.train_top_layers} layers + head")


def frozen_bottom_source(config: MegasegConfig) -> str:
    """What the frozen bottom layers are: the SFT checkpoint (or, under model.random_init, the seeded init)."""
    if config.model.checkpoint is not None:
        return str(config.model.checkpoint)
    return f"model.random_init with seed {config.seed}"


def complete_prefix_features(features: "PrefixFeatures", model: torch.nn.Module, data: Any, micro_batch_size: int,
                             why: str) -> tuple[Optional["PrefixFeatures"], str]:
    """``features`` with every train/eval sequence of ``data`` (a RewardModelData), the ones the entropy pass did
    not see run through ``model``'s bottom; (None, why) when they outgrow their memory limit."""
    pairs = list(data.train) + list(data.eval or [])
    sequences = [side for item in pairs for side in (item.pair.chosen, item.pair.rejected)]
    from_entropy_pass = len(features)
    num_run = 0 if features.overflowed else features.complete(model, sequences, micro_batch_size)
    if features.overflowed:
        return None, (f"the features outgrew {features.max_bytes / 1024 ** 3:.0f} GiB "
                      "(megaseg.training.reward_model.frozen_prefix.FEATURE_MEMORY_LIMIT_BYTES)")
    return features, (f"{why}; {len(features)} sequences, {features.num_bytes / 1024 ** 2:.0f} MiB "
                      f"({from_entropy_pass} from the entropy pass, {num_run} through the bottom layers)")


def _row_lengths(batch: Any) -> list[int]:
    """Real tokens per row of a right-padded micro-batch (a scorer's InferenceMicroBatch or a RewardMicroBatch)."""
    if hasattr(batch, "sequences"):
        return batch.sequences.attention_mask.sum(1).tolist()
    # RewardMicroBatch: the response runs to the row's last real token.
    mask = batch.response_mask
    last = mask.shape[1] - 1 - mask.long().flip(1).argmax(1)
    return (last + 1).tolist()


class PrefixFeatures:
    """The input of layer ``num_bottom_layers`` for every sequence added, [length, hidden] each (in the
    layers' dtype), by token ids.

    ``source`` names the frozen bottom (the SFT checkpoint): a reward model may use these features only if its
    layers below ``num_bottom_layers`` are that checkpoint's (``usable_for``)."""

    def __init__(self, num_bottom_layers: int, source: Optional[str],
                 max_bytes: int = FEATURE_MEMORY_LIMIT_BYTES) -> None:
        self.num_bottom_layers = num_bottom_layers
        self.source = source
        self.max_bytes = max_bytes
        self.num_bytes = 0
        # Set once the features outgrow max_bytes: they are dropped and the caller takes the normal path.
        self.overflowed = False
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, sequence: TokenizedSequence) -> bool:
        return _tokens(sequence) in self._rows

    def add_batch(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int],
                  num_real_rows: int) -> None:
        """hidden_states [S, b, hidden] of a right-padded batch input_ids [b, S]; rows >= num_real_rows are fillers."""
        if self.overflowed:
            return
        for row in range(num_real_rows):
            length = int(lengths[row])
            key = tuple(input_ids[row, :length].tolist())
            if key not in self._rows:
                self._rows[key] = hidden_states[:length, row].clone()
                self.num_bytes += self._rows[key].numel() * self._rows[key].element_size()
        if self.num_bytes > self.max_bytes:
            self._rows.clear()
            self.overflowed = True

    # --- from the entropy pass -------------------------------------------------------------------------------

    def entropy_capture(self) -> "EntropyPassCapture":
        """What megaseg.segmentation.segment_ends_for(capture=...) feeds while it computes entropies."""
        return EntropyPassCapture(self)

    # --- the bottom pass, for sequences the entropy pass did not see (cached entropies, other modes) -------------

    def _micro_batches(self, sequences: Sequence[TokenizedSequence],
                       micro_batch_size: int) -> Iterator[InferenceMicroBatch]:
        """Length-sorted right-padded micro-batches, as the one frozen-model runner (megaseg.models.inference)."""
        for group in plan_micro_batches([len(_tokens(s)) for s in sequences], micro_batch_size):
            for rows, num_real, padded in group:
                batch = collate_sequences([sequences[i] for i in rows], PAD_ID, pad_to_multiple_of=padded)
                yield InferenceMicroBatch(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                          sequences=batch, rows=rows, num_real_rows=num_real)

    @torch.no_grad()
    def complete(self, model: torch.nn.Module, sequences: Sequence[TokenizedSequence], micro_batch_size: int) -> int:
        """Run ``model``'s frozen bottom over the sequences that have no features yet; returns how many it ran.
        ``model``: a scalar-head model whose bottom layers are the frozen SFT layers (the reward model itself)."""
        assert not self.overflowed, "the features outgrew max_bytes; take the normal path"
        missing = list({_tokens(s): s for s in sequences if s not in self}.values())
        for batch in (self._micro_batches(missing, micro_batch_size) if missing else ()):
            hidden = bottom_hidden_states(model, batch.input_ids, batch.position_ids, self.num_bottom_layers)
            self.add_batch(hidden, batch.input_ids, _row_lengths(batch), batch.num_real_rows)
            if self.overflowed:
                break
        return len(missing)

    # --- the top path --------------------------------------------------------------------------------------------

    def hidden_states_for(self, batch: Any) -> torch.Tensor:
        """[S, b, hidden] features of a right-padded micro-batch (zeros at padding: causal attention never reads them
        for a real position)."""
        input_ids = batch.input_ids
        lengths = _row_lengths(batch)
        first = next(iter(self._rows.values()))
        out = torch.zeros(input_ids.shape[1], input_ids.shape[0], first.shape[1], dtype=first.dtype)
        for row, length in enumerate(lengths):
            key = tuple(input_ids[row, :length].tolist())
            features = self._rows.get(key)
            assert features is not None, "a sequence without features: complete() them before the top path"
            out[:length, row] = features
        return out

    def forward(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """megaseg.models.pipeline's ForwardFn: values [b, S] of the batch from its features and the top layers."""
        if packing_of(batch) is not None:
            raise ValueError("the frozen-prefix path takes right-padded micro-batches, not packed ones: collate them "
                             "with packing=False")
        return top_values(model, self.hidden_states_for(batch), self.num_bottom_layers, batch.attention_mask)

    def forward_backward(self, model: torch.nn.Module, micro_batches: Sequence[Any],
                         loss_fn: Callable) -> list[dict[str, torch.Tensor]]:
        """megaseg.models.pipeline.forward_backward through the top layers only (same schedule, loss scaling and
        gradient reduction as the whole model's)."""
        return forward_backward(model, micro_batches, loss_fn, forward=self.forward)

    @torch.no_grad()
    def infer_sequences(self, model: torch.nn.Module, sequences: Sequence[TokenizedSequence], *, micro_batch_size: int,
                        output_fn: Callable, is_last_stage: bool = True,
                        on_progress: Optional[Callable[[int, int], None]] = None) -> list[Any]:
        """megaseg.models.inference.infer_sequences (same micro-batches, same per-row results) through the top
        layers; sequences without features get them first from ``model``'s bottom."""
        self.complete(model, sequences, micro_batch_size)
        results: list[Any] = [None] * len(sequences)
        done = 0
        for batch in self._micro_batches(sequences, micro_batch_size):
            per_row = output_fn(self.forward(model, batch), batch)
            for row, value in zip(batch.rows[:batch.num_real_rows], per_row):
                results[row] = value
            done += batch.num_real_rows
            if on_progress is not None:
                on_progress(done, len(sequences))
        return results

    def usable_for(self, rm_config: MegasegConfig) -> Optional[str]:
        """None when a reward model trained under ``rm_config`` has these frozen bottom layers; else why not."""
        top = rm_config.rm.train_top_layers
        if top is None or rm_config.model.num_layers - top < self.num_bottom_layers:
            return (f"the reward model trained its top {top} layers; the features are the output of layer "
                    f"{self.num_bottom_layers - 1}")
        if frozen_bottom_source(rm_config) != self.source:
            return f"the reward model started from {frozen_bottom_source(rm_config)}, the features from {self.source}"
        return None


class EntropyPassCapture:
    """Fed by the entropy pass (megaseg.segmentation.entropy_pass): while ``attached`` to the SFT language model, the
    input of layer L is taken out of every forward and ``collect(micro_batch)`` files it under each row's tokens."""

    def __init__(self, features: PrefixFeatures) -> None:
        self.features = features
        self._layer = LayerInputCapture(features.num_bottom_layers)

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module) -> Iterator["EntropyPassCapture"]:
        with self._layer.attached(model):
            yield self

    def collect(self, micro_batch: InferenceMicroBatch) -> None:
        self.features.add_batch(self._layer.take(), micro_batch.input_ids, _row_lengths(micro_batch),
                                micro_batch.num_real_rows)
