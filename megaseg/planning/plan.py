"""`megaseg plan`: will a train-rm / train-ppo / train-dpo config fit its GPUs? Per rank and per role bytes
(megaseg.planning.memory), the phase transients, a verdict, and the nearest layouts that fit.

A run holds every model's weights, gradients and Adam state for its whole length; the phases (generation, the
experience forwards, the critic and actor updates) come one after another, so only the largest transient counts:

    per-rank total = sum over roles (weights + gradients + optimizer) + max over phases (transient) + runtime reserve

The runtime reserve (CUDA context, NCCL buffers, allocator fragmentation) is RUNTIME_RESERVE_BYTES.
"""
from __future__ import annotations

import dataclasses
import itertools
import json as json_lib
import sys
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megaseg.config.root import MegasegConfig
from megaseg.planning.memory import (FP32, DTYPE_BYTES, Kernels, Layout, ModelBytes, Recompute, frozen_model_bytes,
                                     kv_cache_bytes, layer_parameters, logits_bytes, stage_activation_bytes,
                                     trained_model_bytes)

GIB = 1024 ** 3
RUNTIME_RESERVE_BYTES = 4 * GIB
PLANNED_COMMANDS = ("train-rm", "train-ppo", "train-dpo")
HARDWARE_KEYS = {"command": str, "nodes": int, "gpus_per_node": int, "gpu_memory_gib": float}
_HARDWARE_LINE = re.compile(r"^#\s*hardware:\s*(.*)$")


@dataclass(frozen=True)
class Hardware:
    command: str
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_memory_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB)


@dataclass(frozen=True)
class Knobs:
    """What the planner may change: the layout, the distributed optimizer, recompute and the micro batch."""

    tp: int
    pp: int
    distributed_optimizer: Optional[bool]  # None: the config's auto rule (on when DP > 1)
    recompute: Recompute
    micro_batch_size: int


@dataclass
class RolePlan:
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}


@dataclass
class Plan:
    command: str
    hardware: Hardware
    layout: Layout
    knobs: Knobs
    roles: dict[str, RolePlan]
    transients: dict[str, int]
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def per_rank_total_bytes(self) -> int:
        static = sum(role.weights + role.gradients + role.optimizer for role in self.roles.values())
        return static + max(self.transients.values(), default=0) + RUNTIME_RESERVE_BYTES

    @property
    def fits(self) -> bool:
        return self.per_rank_total_bytes <= self.hardware.gpu_memory_bytes

    def largest_term(self) -> tuple[str, int]:
        terms = {f"{role}.{name}": value for role, plan in self.roles.items()
                 for name, value in plan.as_dict().items() if name not in ("total", "activations")}
        terms.update({f"transient.{name}": value for name, value in self.transients.items()})
        name = max(terms, key=terms.get)
        return name, terms[name]

    def as_json(self) -> dict[str, Any]:
        return {"fits": self.fits, "gpu_memory_bytes": self.hardware.gpu_memory_bytes,
                "per_rank_total_bytes": self.per_rank_total_bytes,
                "roles": {name: role.as_dict() for name, role in self.roles.items()},
                "suggestions": self.suggestions,
                "command": self.command,
                "layout": {"tensor_model_parallel_size": self.layout.tp, "pipeline_model_parallel_size": self.layout.pp,
                           "data_parallel_size": self.layout.dp, "world_size": self.layout.world_size},
                "use_distributed_optimizer": _distributed(self.knobs, self.layout),
                "recompute": self.knobs.recompute.describe(),
                "micro_batch_size": self.knobs.micro_batch_size,
                "transients": dict(self.transients),
                "runtime_reserve_bytes": RUNTIME_RESERVE_BYTES}


def _distributed(knobs: Knobs, layout: Layout) -> bool:
    return layout.dp > 1 if knobs.distributed_optimizer is None else knobs.distributed_optimizer


# --- the hardware a recipe names ------------------------------------------------------------------------------


def read_hardware_header(config_path: str | Path) -> dict[str, Any]:
    """`# hardware: command=train-ppo nodes=1 gpus_per_node=8 gpu_memory_gib=80` from the config or, failing that,
    the nearest file of its `base:` chain."""
    path = Path(config_path)
    seen = set()
    while path not in seen:
        seen.add(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        text = path.read_text()
        for line in text.splitlines():
            match = _HARDWARE_LINE.match(line.strip())
            if match:
                return _parse_hardware(path, match.group(1))
        base = (yaml.safe_load(text) or {}).get("base")
        if base is None:
            return {}
        path = (path.parent / base).resolve()
    return {}


def _parse_hardware(path: Path, text: str) -> dict[str, Any]:
    values = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if key not in HARDWARE_KEYS or not value:
            raise ValueError(f"{path}: bad `# hardware:` item {item!r}; expected key=value with keys "
                             f"{', '.join(HARDWARE_KEYS)}")
        values[key] = HARDWARE_KEYS[key](value)
    return values


def resolve_hardware(header: dict[str, Any], **flags: Any) -> Hardware:
    values = {**header, **{key: value for key, value in flags.items() if value is not None}}
    if "command" not in values:
        raise ValueError("which command does this config run? pass --trainer train-rm|train-ppo|train-dpo (or add "
                         "`# hardware: command=... nodes=... gpus_per_node=... gpu_memory_gib=...` to its header)")
    if values["command"] not in PLANNED_COMMANDS:
        raise ValueError(f"--trainer {values['command']!r}: megaseg plan covers {', '.join(PLANNED_COMMANDS)}")
    return Hardware(**values)


# --- one plan -------------------------------------------------------------------------------------------------


def knobs_of(config: MegasegConfig, command: str) -> Knobs:
    optimizer = {"train-rm": config.rm.optimizer, "train-dpo": config.dpo.optimizer,
                 "train-ppo": config.ppo.actor_optimizer}[command]
    micro = {"train-rm": config.rm.micro_batch_size, "train-dpo": config.dpo.micro_batch_size,
             "train-ppo": config.ppo.micro_batch_size}[command]
    return Knobs(tp=config.parallel.tensor_model_parallel_size, pp=config.parallel.pipeline_model_parallel_size,
                 distributed_optimizer=optimizer.use_distributed_optimizer, recompute=Recompute.of(config.model),
                 micro_batch_size=micro)


def _trainable(config: MegasegConfig, layout: Layout, top_layers: Optional[int]) -> Optional[int]:
    if top_layers is None:
        return None
    per_stage = min(top_layers, config.model.num_layers // layout.pp)
    return per_stage * layer_parameters(config.model, layout.tp) + 3 * config.model.hidden_size


def _role(bytes_: ModelBytes, activations: int = 0) -> RolePlan:
    return RolePlan(bytes_.weights, bytes_.gradients, bytes_.optimizer, activations)


def build_plan(config: MegasegConfig, hardware: Hardware, knobs: Optional[Knobs] = None) -> Plan:
    knobs = knobs or knobs_of(config, hardware.command)
    world = hardware.world_size
    if world % (knobs.tp * knobs.pp):
        raise ValueError(f"parallel.tensor_model_parallel_size={knobs.tp} x pipeline_model_parallel_size={knobs.pp} "
                         f"does not divide the {world} GPUs of {hardware.nodes} node(s) x {hardware.gpus_per_node}")
    layout = Layout(knobs.tp, knobs.pp, world // (knobs.tp * knobs.pp))
    model = dataclasses.replace(config.model, recompute_granularity=knobs.recompute.granularity,
                                recompute_method=knobs.recompute.method,
                                recompute_num_layers=knobs.recompute.num_layers)
    distributed = _distributed(knobs, layout)
    kernels = Kernels.for_gpu_run(model)

    def activations(seq: int, sequences: int, num_micro_batches: int) -> int:
        return stage_activation_bytes(model, seq, sequences, layout, knobs.recompute, kernels, num_micro_batches)

    def trained(scalar_head: bool, top_layers: Optional[int] = None) -> ModelBytes:
        return trained_model_bytes(model, layout, scalar_head=scalar_head, distributed_optimizer=distributed,
                                   trainable_parameters=_trainable(config, layout, top_layers))

    micro = knobs.micro_batch_size
    roles: dict[str, RolePlan] = {}
    transients: dict[str, int] = {}
    if hardware.command in ("train-rm", "train-dpo"):
        seq = config.data.max_length
        sequences = 2 * micro  # chosen and rejected in one forward
        global_batch = config.rm.global_batch_size if hardware.command == "train-rm" else config.dpo.global_batch_size
        num_micro = max(1, global_batch // (layout.dp * micro))
        if hardware.command == "train-rm":
            acts = activations(seq, sequences, num_micro)
            roles["reward_model"] = _role(trained(True, config.rm.train_top_layers), acts)
            transients["reward_model_update"] = acts
        else:
            acts = activations(seq, sequences, num_micro)
            logits = logits_bytes(model, seq * sequences, layout.tp, entropy=False) + \
                seq * sequences * model.vocab_size // layout.tp * FP32  # the logits' gradient
            roles["policy"] = _role(trained(False), acts + logits)
            roles["reference"] = _role(frozen_model_bytes(model, layout, scalar_head=False))
            transients["policy_update"] = acts + logits
            transients["reference_forward"] = logits_bytes(model, seq * sequences, layout.tp, entropy=False)
    else:
        ppo = config.ppo
        seq = ppo.max_prompt_length + ppo.max_new_tokens
        num_micro = max(1, ppo.train_batch_size // (layout.dp * micro))
        actor_acts = activations(seq, micro, num_micro)
        actor_logits = logits_bytes(model, seq * micro, layout.tp, entropy=True) + \
            seq * micro * model.vocab_size // layout.tp * FP32
        critic_acts = activations(seq, micro, num_micro)
        roles["actor"] = _role(trained(False, ppo.actor_train_top_layers), actor_acts + actor_logits)
        roles["critic"] = _role(trained(True, ppo.critic_train_top_layers), critic_acts)
        roles["reference"] = _role(frozen_model_bytes(model, layout, scalar_head=False))
        roles["reward_model"] = _role(frozen_model_bytes(model, layout, scalar_head=True))
        rollout = ppo.micro_rollout_batch_size
        prefill_logits = rollout * ppo.max_prompt_length * model.vocab_size // layout.tp * \
            DTYPE_BYTES[model.params_dtype]
        transients["generation"] = kv_cache_bytes(model, rollout, seq, layout) + prefill_logits
        transients["experience"] = logits_bytes(model, seq * rollout, layout.tp, entropy=True)
        transients["critic_update"] = critic_acts
        transients["actor_update"] = actor_acts + actor_logits
    return Plan(hardware.command, hardware, layout, knobs, roles, transients)


# --- suggestions ----------------------------------------------------------------------------------------------


def _valid_tp(config: MegasegConfig, tp: int) -> bool:
    m = config.model
    return all(value % tp == 0 for value in (m.num_attention_heads, m.num_query_groups or m.num_attention_heads,
                                             m.ffn_hidden_size, m.vocab_size))


def _global_batch(config: MegasegConfig, command: str) -> int:
    return {"train-rm": config.rm.global_batch_size, "train-dpo": config.dpo.global_batch_size,
            "train-ppo": config.ppo.train_batch_size}[command]


def _overrides(command: str, knobs: Knobs) -> list[str]:
    section = {"train-rm": "rm", "train-dpo": "dpo", "train-ppo": "ppo"}[command]
    optimizers = {"train-rm": ["rm.optimizer"], "train-dpo": ["dpo.optimizer"],
                  "train-ppo": ["ppo.actor_optimizer", "ppo.critic_optimizer"]}[command]
    recompute = knobs.recompute
    out = [f"parallel.tensor_model_parallel_size={knobs.tp}", f"parallel.pipeline_model_parallel_size={knobs.pp}",
           f"{section}.micro_batch_size={knobs.micro_batch_size}",
           f"model.recompute_granularity={recompute.granularity or 'null'}",
           f"model.recompute_method={recompute.method or 'null'}",
           f"model.recompute_num_layers={recompute.num_layers or 'null'}"]
    if knobs.distributed_optimizer is not None:
        out += [f"{name}.use_distributed_optimizer={str(knobs.distributed_optimizer).lower()}" for name in optimizers]
    return out


def suggest_layouts(config: MegasegConfig, hardware: Hardware, current: Knobs, limit: int = 3) -> list[dict]:
    """The fitting layouts that change the fewest knobs (then: most data parallelism, then least memory)."""
    world = hardware.world_size
    tps = [tp for tp in (1, 2, 4, 8) if tp <= hardware.gpus_per_node and _valid_tp(config, tp)]
    pps = [pp for pp in range(1, 17) if config.model.num_layers % pp == 0]
    recomputes = {current.recompute, Recompute("selective"), Recompute("full", "uniform", 1)}
    micros = sorted({current.micro_batch_size, 1})
    scored = []
    for tp, pp, dist, recompute, micro in itertools.product(tps, pps, (current.distributed_optimizer, True),
                                                           recomputes, micros):
        if world % (tp * pp):
            continue
        dp = world // (tp * pp)
        if _global_batch(config, hardware.command) % (dp * micro):
            continue
        knobs = Knobs(tp, pp, dist, recompute, micro)
        if knobs == current:
            continue
        plan = build_plan(config, hardware, knobs)
        if not plan.fits:
            continue
        changed = sum([tp != current.tp, pp != current.pp, dist != current.distributed_optimizer,
                       recompute != current.recompute, micro != current.micro_batch_size])
        scored.append(((changed, tp * pp, plan.per_rank_total_bytes), knobs, plan))
    scored.sort(key=lambda item: item[0])
    suggestions = []
    for _, knobs, plan in scored[:limit]:
        suggestions.append({"tensor_model_parallel_size": knobs.tp, "pipeline_model_parallel_size": knobs.pp,
                            "data_parallel_size": plan.layout.dp,
                            "use_distributed_optimizer": _distributed(knobs, plan.layout),
                            "recompute": knobs.recompute.describe(), "micro_batch_size": knobs.micro_batch_size,
                            "per_rank_total_bytes": plan.per_rank_total_bytes,
                            "overrides": _overrides(hardware.command, knobs)})
    return suggestions


# --- the command ----------------------------------------------------------------------------------------------


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: Plan) -> str:
    layout = plan.layout
    lines = [f"megaseg plan: {plan.command} on {plan.hardware.nodes} node(s) x {plan.hardware.gpus_per_node} GPUs x "
             f"{plan.hardware.gpu_memory_gib:g} GiB; TP={layout.tp} PP={layout.pp} DP={layout.dp}, distributed "
             f"optimizer {'on' if _distributed(plan.knobs, layout) else 'off'}, recompute "
             f"{plan.knobs.recompute.describe()}, micro batch {plan.knobs.micro_batch_size}",
             f"{'role (GiB per rank)':22}{'weights':>9}{'grads':>9}{'optimizer':>10}{'activ.':>9}{'total':>9}"]
    for name, role in plan.roles.items():
        lines.append(f"{name:22}{_gib(role.weights)} {_gib(role.gradients)} {_gib(role.optimizer)}  "
                     f"{_gib(role.activations)} {_gib(role.total)}")
    lines.append("phase transients (only the largest counts): " +
                 ", ".join(f"{name} {value / GIB:.2f}" for name, value in plan.transients.items()))
    lines.append(f"runtime reserve {RUNTIME_RESERVE_BYTES / GIB:.2f} GiB; per-rank total "
                 f"{plan.per_rank_total_bytes / GIB:.2f} GiB of {plan.hardware.gpu_memory_bytes / GIB:.2f} GiB: "
                 + ("fits" if plan.fits else "DOES NOT FIT"))
    if not plan.fits:
        name, value = plan.largest_term()
        lines.append(f"largest term: {name} = {value / GIB:.2f} GiB")
        for suggestion in plan.suggestions:
            lines.append(f"  fits: TP={suggestion['tensor_model_parallel_size']} "
                         f"PP={suggestion['pipeline_model_parallel_size']} DP={suggestion['data_parallel_size']} "
                         f"dist-opt={suggestion['use_distributed_optimizer']} recompute={suggestion['recompute']} "
                         f"micro={suggestion['micro_batch_size']} -> "
                         f"{suggestion['per_rank_total_bytes'] / GIB:.2f} GiB: {' '.join(suggestion['overrides'])}")
        if not plan.suggestions:
            lines.append("  no layout of these GPUs fits: add nodes (--nodes) or shorten the sequences")
    return "\n".join(lines)


def plan_config(config: MegasegConfig, hardware: Hardware) -> Plan:
    plan = build_plan(config, hardware)
    if not plan.fits:
        plan.suggestions = suggest_layouts(config, hardware, plan.knobs)
    return plan


def plan_command(config: MegasegConfig, explicit_keys: frozenset = frozenset(), *, config_path: Optional[str] = None,
                 trainer: Optional[str] = None, gpu_memory_gib: Optional[float] = None,
                 gpus_per_node: Optional[int] = None, nodes: Optional[int] = None, json: bool = False) -> int:
    """Exit code 0 when the config fits, 1 when it does not (the largest term and the nearest fits are printed)."""
    header = read_hardware_header(config_path) if config_path else {}
    hardware = resolve_hardware(header, command=trainer, gpu_memory_gib=gpu_memory_gib, gpus_per_node=gpus_per_node,
                                nodes=nodes)
    plan = plan_config(config, hardware)
    if json:
        print(json_lib.dumps(plan.as_json(), indent=2))
    else:
        print(format_plan(plan))
    if not plan.fits:
        name, value = plan.largest_term()
        print(f"megaseg plan: does not fit: {plan.per_rank_total_bytes / GIB:.2f} GiB per rank > "
              f"{hardware.gpu_memory_gib:g} GiB; largest term {name} = {value / GIB:.2f} GiB", file=sys.stderr)
        return 1
    return 0
