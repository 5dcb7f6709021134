"""`megaseg <command>`: parse the config (YAML + dotted overrides + the command's flags), call one function.

Every command accepts `--config FILE`, `--print-config` and any number of `section.key=value` overrides.
A command's own flags (e.g. `--ckpt`) are sugar for config keys, or plain arguments of its function. Every command
function is called as ``function(config, explicit_keys=..., **flag_arguments)``: ``explicit_keys`` is the set of
dotted settings the user gave (YAML chain, flags, overrides), for commands that layer the user's settings over a saved
config (eval-rm, fit-normalizer over the reward model's; train-ppo's check of rm.aggregation).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megaseg.config import config_to_yaml, load_config
from megaseg.config.loader import explicit_keys


@dataclass(frozen=True)
class Flag:
    option: str
    help: str
    # A dotted config key the flag sets; None passes the value to the command's function as a keyword argument.
    config_key: Optional[str] = None
    type: Callable = str
    is_switch: bool = False  # a flag without a value (store_true), passed as a keyword argument


@dataclass(frozen=True)
class Command:
    name: str
    target: str  # "module:function"; the function takes (config, explicit_keys, **flag_arguments) -> exit code
    help: str
    flags: tuple[Flag, ...] = ()
    # A YAML shipped in the megaseg package (path relative to it) used when no --config is given, so that the
    # command's own defaults sit under the command-line overrides (the quickstart's embedded config).
    default_config: Optional[str] = None
    # Pass the --config path to the function as `config_path` (a command that reads the file's header comments).
    wants_config_path: bool = False

    def default_config_path(self) -> Optional[str]:
        if self.default_config is None:
            return None
        import importlib.resources

        return str(importlib.resources.files("megaseg").joinpath(self.default_config))


COMMANDS: tuple[Command, ...] = (
    Command("quickstart", "megaseg.quickstart:run_quickstart",
            "the embedded default: SmolLM2 -> segment RM on real HH-RLHF pairs -> normalizer -> evaluation",
            (Flag("--out", "output directory", config_key="logging.out_dir"),),
            default_config="resources/configs/quickstart.yaml"),
    Command("segment", "megaseg.segmentation.command:run_segmentation",
            "cache segment boundaries of every response with the frozen SFT model"),
    Command("train-rm", "megaseg.training.reward_model.trainer:train_reward_model", "train a segment-level reward model"),
    Command("fit-normalizer", "megaseg.scoring.fit_normalizer:fit_normalizer_command",
            "score a calibration set and fit the location-aware normalizer",
            (Flag("--ckpt", "reward model checkpoint", config_key="rm.checkpoint"),
             Flag("--data", "calibration preference file", config_key="data.train_path"),
             Flag("--num-samples", "calibration pairs to score", config_key="normalizer.num_samples", type=int),
             Flag("--method", "huber or ols", config_key="normalizer.method"))),
    Command("eval-rm", "megaseg.scoring.evaluate:evaluate_reward_model_command",
            "accuracy, margin and segment statistics of a reward model on a preference file",
            (Flag("--ckpt", "reward model checkpoint", config_key="rm.checkpoint"),
             Flag("--data", "preference file", config_key="data.eval_path"),
             Flag("--out", "write the metrics JSON here"),
             Flag("--details", "write per-pair scores with every segment's reward, p and text here (JSONL)"))),
    Command("show-segments", "megaseg.evaluation.segment_report:show_segments_command",
            "one self-contained HTML page of responses coloured segment by segment by their reward (paper Fig. 2)",
            (Flag("--reward-model", "reward model to score --data with", config_key="rm.checkpoint"),
             Flag("--data", "preference file to score", config_key="data.eval_path"),
             Flag("--samples", "a PPO run's samples.jsonl"),
             Flag("--details", "per-pair records written by eval-rm --details"),
             Flag("--color", "raw (default) or normalized"),
             Flag("--max-items", "show the first N records only", type=int),
             Flag("--out", "the HTML file to write"))),
    Command("generate", "megaseg.evaluation.generate:generate_command",
            "benchmark answer files (MT-Bench, Arena-Hard, AlpacaEval) from a policy checkpoint, resumable",
            (Flag("--ckpt", "policy checkpoint (converted SFT model, a step's actor/ or policy/, a run's root)"),
             Flag("--bench", "mt_bench | arena_hard | alpaca_eval", config_key="generate.bench"),
             Flag("--prompts", "question file (default: the shipped MT-Bench / Arena-Hard set)",
                  config_key="data.prompt_path"),
             Flag("--model-id", "model_id / generator written in the answers", config_key="generate.model_id"),
             Flag("--max-new-tokens", "tokens per answer (default: the benchmark's)",
                  config_key="generate.max_new_tokens", type=int),
             Flag("--max-prompts", "answer the first N questions only", config_key="generate.max_prompts", type=int),
             Flag("--out", "output directory"))),
    Command("compare", "megaseg.evaluation.compare:compare_command",
            "judge-free pairwise win rate of one answer file over another, scored by a reward model",
            (Flag("--answers", "answer file of the model under test"),
             Flag("--baseline", "answer file of the baseline model"),
             Flag("--reward-model", "megaseg reward model directory", config_key="rm.checkpoint"),
             Flag("--prompts", "question file (MT-Bench / Arena-Hard answers carry ids only)",
                  config_key="data.prompt_path"),
             Flag("--bench", "mt_bench | arena_hard | alpaca_eval (default: from the answer files)",
                  config_key="generate.bench"),
             Flag("--out", "write the result JSON here"))),
    Command("train-ppo", "megaseg.training.ppo.trainer:train_ppo", "PPO against a segment (or baseline) reward model"),
    Command("train-dpo", "megaseg.training.dpo.trainer:train_dpo", "DPO on the same preference data (paper Table 3)"),
    Command("convert", "megaseg.conversion.cli:convert_command",
            "checkpoint conversion: hf-to-megatron, megatron-to-hf, gguf-to-hf",
            (Flag("direction", "hf-to-megatron | megatron-to-hf | gguf-to-hf"),
             Flag("--hf", "Hugging Face model directory"),
             Flag("--ckpt", "megatron checkpoint directory"),
             Flag("--gguf", "GGUF file (or a directory holding one)"),
             Flag("--out", "output directory"),
             Flag("--tp", "tensor-parallel size of the output", type=int),
             Flag("--pp", "pipeline-parallel size of the output", type=int))),
    Command("plan", "megaseg.planning.plan:plan_command",
            "per-rank GPU memory of a train-rm / train-ppo / train-dpo config: fits or not, and layouts that fit",
            (Flag("--trainer", "train-rm | train-ppo | train-dpo (default: the config's `# hardware:` header)"),
             Flag("--gpu-memory-gib", "memory per GPU (default: header, else 80)", type=float),
             Flag("--gpus-per-node", "GPUs per node (default: header, else 8)", type=int),
             Flag("--nodes", "nodes (default: header, else 1)", type=int),
             Flag("--json", "print one JSON object", is_switch=True)),
            wants_config_path=True),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        config_help = "YAML config (may name a `base:` YAML to start from)"
        if command.default_config is not None:
            config_help += f"; default: the embedded {command.default_config_path()}"
        sub.add_argument("--config", help=config_help)
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        for flag in command.flags:
            if flag.is_switch:
                sub.add_argument(flag.option, help=flag.help, action="store_true", default=None)
            else:
                sub.add_argument(flag.option, help=flag.help, type=flag.type)
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def _split_flags(command: Command, args: argparse.Namespace) -> tuple[list[str], dict]:
    overrides, kwargs = [], {}
    for flag in command.flags:
        value = getattr(args, flag.option.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if flag.config_key is None:
            kwargs[flag.option.lstrip("-").replace("-", "_")] = value
        else:
            overrides.append(f"{flag.config_key}={value}")
    return overrides, kwargs


def resolve_target(command: Command) -> Callable:
    module_name, function_name = command.target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    flag_overrides, kwargs = _split_flags(command, args)
    # Flags come first so that explicit key=value overrides win over them.
    config_path, overrides = args.config or command.default_config_path(), [*flag_overrides, *args.overrides]
    try:
        config = load_config(config_path, overrides)
        given = explicit_keys(config_path, overrides)
    except ValueError as error:
        print(f"megaseg {command.name}: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    if command.wants_config_path:
        kwargs["config_path"] = config_path
    try:
        return int(resolve_target(command)(config, explicit_keys=given, **kwargs) or 0)
    except ValueError as error:
        # User mistakes (bad data, missing files, mismatched checkpoints) are ValueErrors with the fix in the text.
        print(f"megaseg {command.name}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
