"""megatron-core dist checkpoint (any TP/PP) -> Hugging Face directory; causal LMs, reward models and critics.

A GPTModel checkpoint becomes `<Arch>ForCausalLM`. A megaseg reward model or critic (backbone + scalar head
`head.weight` [1, hidden], see megaseg.models.scalar_head) becomes `<Arch>ForTokenClassification` with
num_labels=1: its `score` Linear holds the head's weight and a zero bias (transformers always creates the bias), so
the per-token scores are exactly megaseg's per-position values. Loading it, offline:

    from transformers import AutoModelForTokenClassification, AutoTokenizer
    model = AutoModelForTokenClassification.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    values = model(input_ids).logits[..., 0]        # [batch, seq]: the reward of a segment ending at each token

The backbone is stored in the checkpoint's params dtype and the head in its own (fp32 by default); transformers
casts both to one dtype on load (pass dtype=torch.float32 to keep the head exact).

The checkpoint is read in this one process, one decoder layer at a time (megatron's layer-stacked tensors sliced by
dist_checkpointing), so peak memory is one layer plus the shard being written (<= 5 GiB), never the whole model.
The model config comes from `megaseg_model.yaml` / a run's `config.yaml` beside (or above) the checkpoint; the
source model's config.json (kept in `hf_metadata/` by hf-to-megatron) supplies the token ids and other HF-only
fields, so an HF -> megatron -> HF round trip gives back the same config and bit-identical weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megaseg.config.model import ModelConfig
from megaseg.conversion.hf_architectures import HFArchitecture, architecture_for_family, hf_config_from_model_config
from megaseg.conversion.hf_checkpoint import (CONFIG_FILE, GENERATION_CONFIG_FILE, HFSafetensorsWriter,
                                              copy_tokenizer_files, read_json, write_json)
from megaseg.conversion.hf_to_megatron import HF_METADATA_DIR
from megaseg.conversion.megatron_checkpoint import DistCheckpointReader
from megaseg.conversion.model_yaml import find_model_config
from megaseg.conversion.staged_output import check_output_dir_free, staged_output_dir
from megaseg.conversion.weight_names import (EMBEDDING, FINAL_NORM, HF_LAYER_PREFIX, OUTPUT_LAYER, ModelShape,
                                             logical_from_megatron, megatron_layer_names, physical_from_logical)

logger = logging.getLogger(__name__)

SCALAR_HEAD = "head.weight"  # megaseg.models.scalar_head.ScalarHeadModel.head
HF_SCORE_WEIGHT, HF_SCORE_BIAS = "score.weight", "score.bias"


@dataclass(frozen=True)
class MegatronToHFPlan:
    ckpt_dir: Path
    out: Path
    model_cfg: ModelConfig
    arch: HFArchitecture
    scalar_head: bool  # a reward model / critic (exported for token classification) rather than a causal LM
    hf_metadata_dir: Optional[Path]  # the source model's config.json / generation_config.json, when known


def _resolve_model_config(ckpt_dir: Path, model_cfg: Optional[ModelConfig]) -> tuple[ModelConfig, str]:
    """(model config, where it came from): the checkpoint's saved one wins over the one passed in."""
    found = find_model_config(ckpt_dir)
    if found is not None:
        return found[0], str(found[1])
    if model_cfg is None:
        raise ValueError(f"no megaseg_model.yaml or config.yaml in {ckpt_dir} or above it; pass the model's "
                         "config with --config FILE (holding its `model:` section)")
    return model_cfg, f"the given config (model.name={model_cfg.name!r}; no megaseg_model.yaml beside the checkpoint)"


def resolve_dist_checkpoint_dir(ckpt: Path) -> Path:
    """The directory holding the dist checkpoint's metadata.json: `ckpt` itself (what hf-to-megatron writes, or a
    step's `<step>/<role>`), a reward-model directory's `state/` (<run>/reward_model), a training step holding one
    model (train-rm, train-dpo), or that step of a checkpoint root's `latest`. A step holding several models
    (train-ppo's actor and critic) must be named with its role."""
    from megaseg.checkpoint.step_dirs import CHECKPOINT_METADATA, LATEST_FILE, RNG_DIR

    def model_dirs(step_dir: Path) -> list[Path]:
        return sorted(path for path in step_dir.iterdir() if path.name != RNG_DIR and
                      (path / CHECKPOINT_METADATA).is_file()) if step_dir.is_dir() else []

    candidates = [ckpt, ckpt / "state", ckpt / "reward_model" / "state"]
    steps = [ckpt]
    if (ckpt / LATEST_FILE).is_file():
        steps.append(ckpt / (ckpt / LATEST_FILE).read_text().strip())
    for candidate in candidates:
        if (candidate / CHECKPOINT_METADATA).is_file():
            return candidate
    for step in steps:
        models = model_dirs(step)
        if len(models) == 1:
            return models[0]
        if models:
            raise ValueError(f"--ckpt {step} holds {len(models)} models ({', '.join(m.name for m in models)}): "
                             f"name one, e.g. --ckpt {models[0]}")
    raise ValueError(f"--ckpt {ckpt} is not a megatron dist checkpoint: no {CHECKPOINT_METADATA} in "
                     f"{', '.join(str(c) for c in candidates)} nor in a training step's model directory")


def _hf_metadata_dir(ckpt_dir: Path, model_cfg: ModelConfig) -> Optional[Path]:
    """`hf_metadata/` of the checkpoint itself, or of the converted checkpoint it was trained from."""
    candidates = [ckpt_dir / HF_METADATA_DIR]
    if model_cfg.checkpoint:
        candidates.append(Path(model_cfg.checkpoint) / HF_METADATA_DIR)
    return next((path for path in candidates if (path / CONFIG_FILE).is_file()), None)


def expected_megatron_shapes(shape: ModelShape, scalar_head: bool) -> Dict[str, tuple[int, ...]]:
    """Whole-tensor shapes (decoder layer tensors per layer, without the stacking axis) by local-spec name."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qkv_rows = shape.q_rows + 2 * shape.kv_rows
    shapes = {EMBEDDING[0]: (shape.vocab_size, h), FINAL_NORM[0]: (h,),
              "input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv_rows, h),
              "self_attention.linear_proj.weight": (h, shape.q_rows), "pre_mlp_layernorm.weight": (h,),
              "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}
    if shape.qkv_bias:
        shapes["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if scalar_head:
        shapes[SCALAR_HEAD] = (1, h)
    elif not shape.tied_embeddings:
        shapes[OUTPUT_LAYER[0]] = (shape.vocab_size, h)
    return shapes


def _check_checkpoint(reader: DistCheckpointReader, shape: ModelShape, scalar_head: bool, source: str) -> None:
    """ValueError when the checkpoint's tensors do not have the shapes the model config implies."""
    problems = []
    for name, expected in expected_megatron_shapes(shape, scalar_head).items():
        if name in (EMBEDDING[0], FINAL_NORM[0], OUTPUT_LAYER[0], SCALAR_HEAD):
            found = reader.global_shape(name) if reader.has(name) else None
        else:
            found = reader.layer_shape(name)
            if found is not None and found[0] != shape.num_layers:
                problems.append(f"{name}: {found[0]} layers, config says {shape.num_layers}")
            found = found[1:] if found is not None else None
        if found is None:
            problems.append(f"{name}: missing")
        elif tuple(found) != expected:
            problems.append(f"{name}: stored {tuple(found)}, config implies {expected}")
    if problems:
        raise ValueError(f"{reader.ckpt_dir} does not match the model config from {source}: "
                         f"{'; '.join(problems[:6])}")


def plan_megatron_to_hf(ckpt: str | Path, out: str | Path, model_cfg: Optional[ModelConfig] = None,
                        reader: Optional[DistCheckpointReader] = None) -> MegatronToHFPlan:
    """Validate an export without writing anything; ValueError naming the first problem."""
    ckpt_dir, out = Path(ckpt).absolute(), Path(out).absolute()
    if not ckpt_dir.is_dir():
        raise ValueError(f"--ckpt {ckpt_dir} is not a directory")
    check_output_dir_free(out)
    model_cfg, source = _resolve_model_config(ckpt_dir, model_cfg)
    logger.info("model config of %s: %s", ckpt_dir, source)
    arch = architecture_for_family(model_cfg.family)
    if model_cfg.activation != "swiglu" or model_cfg.normalization != "RMSNorm":
        raise ValueError(f"model.activation={model_cfg.activation!r} / model.normalization="
                         f"{model_cfg.normalization!r}: the {arch.causal_lm_class} export needs swiglu and RMSNorm")
    reader = reader or DistCheckpointReader(ckpt_dir)
    scalar_head = reader.has(SCALAR_HEAD)
    _check_checkpoint(reader, ModelShape.from_model_config(model_cfg), scalar_head, source)
    return MegatronToHFPlan(ckpt_dir=ckpt_dir, out=out, model_cfg=model_cfg, arch=arch, scalar_head=scalar_head,
                            hf_metadata_dir=_hf_metadata_dir(ckpt_dir, model_cfg))


def _write_weights(plan: MegatronToHFPlan, reader: DistCheckpointReader, writer: HFSafetensorsWriter) -> None:
    shape = ModelShape.from_model_config(plan.model_cfg)
    writer.add(EMBEDDING[1], reader.tensors([EMBEDDING[0]])[EMBEDDING[0]])
    for layer in range(shape.num_layers):
        megatron = reader.layer_tensors(layer, list(megatron_layer_names(shape)))
        physical = physical_from_logical(plan.arch, logical_from_megatron(shape, megatron))
        for name, tensor in physical.items():
            writer.add(HF_LAYER_PREFIX.format(layer=layer) + name, tensor)
        logger.debug("exported layer %d/%d", layer + 1, shape.num_layers)
    writer.add(FINAL_NORM[1], reader.tensors([FINAL_NORM[0]])[FINAL_NORM[0]])
    if plan.scalar_head:
        head = reader.tensors([SCALAR_HEAD])[SCALAR_HEAD]
        writer.add(HF_SCORE_WEIGHT, head)
        writer.add(HF_SCORE_BIAS, torch.zeros(1, dtype=head.dtype))
    elif not shape.tied_embeddings:
        writer.add(OUTPUT_LAYER[1], reader.tensors([OUTPUT_LAYER[0]])[OUTPUT_LAYER[0]])


def _write_configs(plan: MegatronToHFPlan, staging: Path) -> None:
    base: Dict[str, Any] = {}
    generation: Optional[Dict[str, Any]] = None
    if plan.hf_metadata_dir is not None:
        base = read_json(plan.hf_metadata_dir / CONFIG_FILE)
        if (plan.hf_metadata_dir / GENERATION_CONFIG_FILE).is_file():
            generation = read_json(plan.hf_metadata_dir / GENERATION_CONFIG_FILE)
    write_json(staging / CONFIG_FILE, hf_config_from_model_config(plan.model_cfg, base, plan.scalar_head))
    if generation is None and plan.model_cfg.eos_token_ids:
        eos = plan.model_cfg.eos_token_ids
        generation = {"eos_token_id": eos[0] if len(eos) == 1 else list(eos)}
        if base.get("bos_token_id") is not None:
            generation["bos_token_id"] = base["bos_token_id"]
    if generation is not None:
        write_json(staging / GENERATION_CONFIG_FILE, generation)


def _copy_tokenizer(plan: MegatronToHFPlan, staging: Path) -> None:
    tokenizer = plan.model_cfg.tokenizer
    copied = copy_tokenizer_files(Path(tokenizer), staging) if tokenizer and Path(tokenizer).is_dir() else []
    if not copied:
        logger.warning("model.tokenizer=%r is not a directory holding tokenizer files: %s gets no tokenizer",
                       tokenizer, plan.out)


def execute_megatron_to_hf(plan: MegatronToHFPlan, reader: DistCheckpointReader) -> Path:
    with staged_output_dir(plan.out) as staging:
        writer = HFSafetensorsWriter(staging)
        _write_weights(plan, reader, writer)
        writer.close()
        _write_configs(plan, staging)
        _copy_tokenizer(plan, staging)
    kind = plan.arch.token_classification_class if plan.scalar_head else plan.arch.causal_lm_class
    logger.info("wrote %s (%s) from %s", plan.out, kind, plan.ckpt_dir)
    return plan.out


def convert_megatron_to_hf(ckpt: str | Path, out: str | Path, model_cfg: Optional[ModelConfig] = None) -> Path:
    """Export a dist checkpoint to an HF directory; `model_cfg` is used only when no saved config is found.

    `ckpt` may be a converted checkpoint, a training step directory, a checkpoint root with `latest`, or a
    train-rm run / reward-model directory. Runs in this one process and needs no torch.distributed world."""
    ckpt = Path(ckpt).absolute()
    if not ckpt.is_dir():
        raise ValueError(f"--ckpt {ckpt} is not a directory")
    ckpt_dir = resolve_dist_checkpoint_dir(ckpt)
    reader = DistCheckpointReader(ckpt_dir)
    plan = plan_megatron_to_hf(ckpt_dir, out, model_cfg, reader)
    return execute_megatron_to_hf(plan, reader)
