"""Hugging Face causal LM directory -> megatron-core dist checkpoint + megaseg_model.yaml + tokenizer.

Output layout (`<out>` is itself the dist checkpoint, so `model.checkpoint=<out>`):
    <out>/metadata.json, common.pt, *.distcp   dist_checkpointing (torch_dist), loadable at any TP/PP
    <out>/megaseg_model.yaml                   the `model:` section, absolute checkpoint/tokenizer paths
    <out>/tokenizer/                           the tokenizer files (chat template included)
    <out>/hf_metadata/                         the source config.json / generation_config.json, reused on export

Everything is checked before anything is written (architecture, every tensor's presence and shape, the TP/PP
layout), and the output is written into a staging directory renamed into place at the end.

Memory: the TP*PP ranks together hold the model once, in its stored dtype (each rank builds only its part). The HF
safetensors are memory-mapped and read one tensor at a time; a rank additionally holds one decoder layer's tensors
(briefly twice while reordering them into megatron's layout) while it copies its slices out. Peak ~= model size +
one or two layers per rank, e.g. ~141 GB + 8 x 1.7-3.4 GB for Llama-3-70B in bf16 at TP=8, never two copies.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.conversion.hf_architectures import HFArchitecture, eos_ids, model_config_from_hf, resolve_architecture
from megaseg.conversion.hf_checkpoint import (CONFIG_FILE, GENERATION_CONFIG_FILE, HFSafetensorsReader,
                                              check_tensor_shapes, copy_tokenizer_files, read_generation_config,
                                              read_json)
from megaseg.conversion.megatron_checkpoint import fill_sharded_state_dict, save_model_checkpoint
from megaseg.conversion.model_yaml import write_model_yaml
from megaseg.conversion.staged_output import check_output_dir_free, staged_output_dir
from megaseg.conversion.weight_names import (EMBEDDING, FINAL_NORM, HF_LAYER_PREFIX, IGNORABLE_HF_SUFFIXES,
                                             OUTPUT_LAYER, ModelShape, hf_tensor_shapes, logical_from_physical,
                                             megatron_from_logical)

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
HF_METADATA_DIR = "hf_metadata"
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# A conversion of a big model on many ranks may legitimately take hours; the spawn helper's default is 3 minutes.
SPAWN_TIMEOUT_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class HFToMegatronPlan:
    """A validated conversion: what will be written where. Picklable, so spawned ranks receive it whole."""

    hf_dir: Path
    out: Path
    arch: HFArchitecture
    model_cfg: ModelConfig  # checkpoint/tokenizer already point at the final `out` paths
    parallel_cfg: ParallelConfig


def _stored_params_dtype(reader: HFSafetensorsReader, declared: str, names: list[str]) -> str:
    """The dtype the weights are stored in, which the megatron model keeps so that nothing is rounded."""
    stored = reader.dtype(EMBEDDING[1])
    others = sorted({reader.dtype(name) for name in names} - {stored})
    if others:
        logger.warning("%s: the weights mix dtypes (%s besides the embedding's %s); the megatron model holds "
                       "everything as %s, so those tensors are cast", reader.model_dir, others, stored, stored)
    if stored not in SAFETENSORS_DTYPES:
        raise ValueError(f"{reader.model_dir}: {EMBEDDING[1]} is stored as {stored}; megaseg converts "
                         f"{sorted(SAFETENSORS_DTYPES)} weights")
    if SAFETENSORS_DTYPES[stored] != declared:
        logger.warning("%s: config.json says dtype=%s but the weights are stored as %s; keeping %s",
                       reader.model_dir, declared, stored, SAFETENSORS_DTYPES[stored])
    return SAFETENSORS_DTYPES[stored]


def _ignorable_names(reader: HFSafetensorsReader, shape: ModelShape) -> list[str]:
    ignorable = [name for name in reader.names if name.endswith(IGNORABLE_HF_SUFFIXES)]
    if shape.tied_embeddings and OUTPUT_LAYER[1] in reader.names:
        logger.warning("%s: tie_word_embeddings=true, so the stored %s is ignored (the embedding is the output "
                       "layer)", reader.model_dir, OUTPUT_LAYER[1])
        ignorable.append(OUTPUT_LAYER[1])
    return ignorable


def _check_layout(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> None:
    from megaseg.models.backend import resolve_transformer_impl
    from megaseg.models.transformer_config import check_parallel_layout

    check_parallel_layout(model_cfg, parallel_cfg, resolve_transformer_impl(model_cfg))


def plan_hf_to_megatron(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1) -> HFToMegatronPlan:
    """Validate a conversion without writing anything; ValueError naming the first problem and its fix."""
    hf_dir, out = Path(hf_dir).absolute(), Path(out).absolute()
    if not hf_dir.is_dir():
        raise ValueError(f"--hf {hf_dir} is not a directory")
    check_output_dir_free(out)
    hf_config = read_json(hf_dir / CONFIG_FILE)
    arch = resolve_architecture(hf_config)
    if any(name.endswith("ForTokenClassification") for name in hf_config.get("architectures") or []):
        raise ValueError(f"{hf_dir} is a {hf_config['architectures'][0]} (a reward model export); hf-to-megatron "
                         f"imports causal LMs ({arch.causal_lm_class}): megaseg adds the scalar head itself")
    model_cfg = model_config_from_hf(hf_config)
    generation = read_generation_config(hf_dir) or {}
    shape = ModelShape.from_model_config(model_cfg)
    expected = hf_tensor_shapes(arch, shape)
    with HFSafetensorsReader(hf_dir) as reader:
        check_tensor_shapes(reader, expected, _ignorable_names(reader, shape))
        params_dtype = _stored_params_dtype(reader, model_cfg.params_dtype, list(expected))
    has_tokenizer = any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_tokenizer:
        logger.warning("%s has no tokenizer files; model.tokenizer stays unset in %s", hf_dir, out)
    model_cfg = dataclasses.replace(
        model_cfg, name=hf_dir.name, params_dtype=params_dtype, checkpoint=str(out),
        tokenizer=str(out / TOKENIZER_DIR) if has_tokenizer else None,
        eos_token_ids=eos_ids(generation.get("eos_token_id")) or model_cfg.eos_token_ids)
    for name, value in (("--tp", tp), ("--pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    parallel_cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        _check_layout(model_cfg, parallel_cfg)
    except ValueError as error:
        raise ValueError(f"{hf_dir} cannot be split with --tp {tp} --pp {pp}: {error}") from None
    return HFToMegatronPlan(hf_dir=hf_dir, out=out, arch=arch, model_cfg=model_cfg, parallel_cfg=parallel_cfg)


class HFGlobalTensors:
    """Whole megatron tensors computed from an HF checkpoint; keeps only the current decoder layer converted."""

    def __init__(self, reader: HFSafetensorsReader, arch: HFArchitecture, shape: ModelShape) -> None:
        self.reader, self.arch, self.shape = reader, arch, shape
        self._layer: Optional[int] = None
        self._layer_tensors: Dict[str, torch.Tensor] = {}

    def __call__(self, layer: Optional[int], name: str) -> torch.Tensor:
        if layer is None:
            return self._global(name)
        if layer != self._layer:
            prefix = HF_LAYER_PREFIX.format(layer=layer)
            logical = logical_from_physical(self.arch, self.shape, lambda n: self.reader.get(prefix + n))
            self._layer_tensors, self._layer = megatron_from_logical(self.shape, logical), layer
        if name not in self._layer_tensors:
            raise ValueError(f"the megatron model asks for decoder layer tensor {name!r}, which has no Hugging Face "
                             f"counterpart in {self.arch.causal_lm_class}")
        return self._layer_tensors[name]

    def _global(self, name: str) -> torch.Tensor:
        if name == EMBEDDING[0] or (name == OUTPUT_LAYER[0] and self.shape.tied_embeddings):
            return self.reader.get(EMBEDDING[1])
        if name == FINAL_NORM[0]:
            return self.reader.get(FINAL_NORM[1])
        if name == OUTPUT_LAYER[0]:
            return self.reader.get(OUTPUT_LAYER[1])
        raise ValueError(f"the megatron model asks for {name!r}, which has no Hugging Face counterpart")


def save_rank(rank: int, world_size: int, plan: HFToMegatronPlan, ckpt_dir: str) -> int:
    """One rank of the conversion: build this rank's part, fill it from the HF files, save. Returns shards filled."""
    from megaseg.models.gpt import build_gpt_model
    from megaseg.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(plan.parallel_cfg, seed=0)
    try:
        model = build_gpt_model(plan.model_cfg, plan.parallel_cfg)
        with HFSafetensorsReader(plan.hf_dir) as reader:
            filled = fill_sharded_state_dict(
                model.sharded_state_dict(),
                HFGlobalTensors(reader, plan.arch, ModelShape.from_model_config(plan.model_cfg)))
        save_model_checkpoint(model, Path(ckpt_dir))
        return filled
    finally:
        destroy_parallel()


def _save_all_ranks(plan: HFToMegatronPlan, ckpt_dir: Path) -> None:
    import torch.distributed as dist

    world_size = plan.parallel_cfg.tensor_model_parallel_size * plan.parallel_cfg.pipeline_model_parallel_size
    if world_size == 1 and not dist.is_initialized():
        save_rank(0, 1, plan, str(ckpt_dir))
        return
    # Each rank is a fresh process with its own torch.distributed world (and the caller's stays untouched).
    from megaseg.parallel.spawn import run_distributed

    run_distributed(save_rank, world_size, plan, str(ckpt_dir), timeout=SPAWN_TIMEOUT_SECONDS)


def execute_hf_to_megatron(plan: HFToMegatronPlan) -> Path:
    with staged_output_dir(plan.out) as staging:
        # dist_checkpointing warns about an "old incomplete checkpoint" in a non-empty dir: weights go first.
        _save_all_ranks(plan, staging)
        if plan.model_cfg.tokenizer is not None:
            copy_tokenizer_files(plan.hf_dir, staging / TOKENIZER_DIR)
        (staging / HF_METADATA_DIR).mkdir()
        for name in (CONFIG_FILE, GENERATION_CONFIG_FILE):
            if (plan.hf_dir / name).is_file():
                shutil.copy2(plan.hf_dir / name, staging / HF_METADATA_DIR / name)
        write_model_yaml(plan.model_cfg, staging)
    logger.info("wrote %s (TP=%d, PP=%d) from %s", plan.out, plan.parallel_cfg.tensor_model_parallel_size,
                plan.parallel_cfg.pipeline_model_parallel_size, plan.hf_dir)
    return plan.out


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Convert an HF causal LM directory into a megatron dist checkpoint saved by TP*PP ranks; returns `out`."""
    return execute_hf_to_megatron(plan_hf_to_megatron(hf_dir, out, tp, pp))
