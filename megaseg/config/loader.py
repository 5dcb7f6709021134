"""YAML + dotted command-line overrides -> a validated, frozen MegasegConfig; and saving it beside a run.

A YAML file may name another one to start from with a top-level `base: relative/or/absolute.yaml`;
later layers win: schema defaults < base files < the file < command-line `key=value` overrides.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megaseg.config.data import SHIPPED_PREFIX
from megaseg.config.root import MegasegConfig

BASE_KEY = "base"
RESOLVED_CONFIG_NAME = "config.yaml"


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file and its `base:` ancestors, oldest first, each with its path for error messages."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: `base:` chain loops back onto itself ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        layer = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: report the file, not a bare traceback
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(layer, DictConfig):
        raise ValueError(f"{path}: the top level must be a mapping of config sections")
    chain: list[tuple[str, DictConfig]] = []
    if BASE_KEY in layer:
        base = Path(str(layer.pop(BASE_KEY)))
        if not base.is_absolute():
            base = path.parent / base
        chain.extend(_read_yaml_chain(base, seen + (path,)))
    chain.append((str(path), layer))
    return chain


def _merge_layer(merged: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as error:
        # OmegaConf appends reference/object types on extra lines; the first line says what is wrong.
        key = getattr(error, "full_key", None) or "?"
        raise ValueError(f"{source}: bad config key {key!r}: {str(error).splitlines()[0]}") from None


def flat_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf setting of a config (dataclass) tree."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flat_settings(value, key + "."))
        else:
            flat[key] = value
    return flat


def with_settings(config: Any, settings: dict[str, Any]) -> Any:
    """``config`` with the dotted ``settings`` replaced (``{"rm.aggregation": "sum"}``), validated again."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = value
    for head, inner in nested.items():
        changes[head] = with_settings(getattr(config, head), inner)
    return dataclasses.replace(config, **changes) if changes else config


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        keys = []
        for name in node.keys():
            keys += _dotted_keys(node._get_node(name), f"{prefix}{name}.")
        return keys
    return [prefix[:-1]]


def explicit_keys(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> frozenset[str]:
    """The dotted settings the user gave (in the YAML chain of ``path`` or as overrides), whatever their values:
    "given" is never confused with "equal to the schema default". Call after ``load_config`` validated them."""
    leaves = set(flat_settings(MegasegConfig()))
    layers = [layer for _, layer in _read_yaml_chain(Path(path))] if path is not None else []
    layers += [OmegaConf.from_dotlist([override]) for override in overrides]
    given = set()
    for layer in layers:
        for key in _dotted_keys(layer):
            # A dict-valued setting (model.rope_scaling) counts as given when any of its entries is.
            while key and key not in leaves:
                key = key.rpartition(".")[0]
            if key:
                given.add(key)
    return frozenset(given)


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> MegasegConfig:
    """Resolve and validate the configuration; raises ValueError naming the file/field on any mistake."""
    merged = OmegaConf.structured(MegasegConfig)
    if path is not None:
        for source, layer in _read_yaml_chain(Path(path)):
            merged = _merge_layer(merged, layer, source)
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"command-line override {override!r} must look like section.key=value")
        merged = _merge_layer(merged, OmegaConf.from_dotlist([override]), f"command line {override!r}")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid config: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        raise ValueError(_with_section_path(merged, str(error))) from None


def _with_section_path(merged: DictConfig, message: str) -> str:
    """A section's own check names its fields from the section down ("optimizer.lr=..."); a section type used in
    several places (the four optimizers) needs the full path ("ppo.critic_optimizer.lr=..."): the deepest
    sub-tree that fails by itself says where."""

    def failing(node: DictConfig, path: tuple[str, ...]) -> Optional[tuple[str, ...]]:
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                found = failing(child, (*path, str(key)))
                if found is not None:
                    return found
        if not path:
            return None
        try:
            OmegaConf.to_object(node)
        except ValueError:
            return path
        return None

    path = failing(merged, ())
    own_name = re.match(r"^\w+\.", message)  # the section's name for itself, e.g. "optimizer."
    if path and own_name:
        return ".".join(path) + "." + message[own_name.end():]
    return message


def config_to_yaml(config: MegasegConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: MegasegConfig, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config as <out_dir>/config.yaml (atomically) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RESOLVED_CONFIG_NAME
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(config_to_yaml(config))
    tmp.replace(target)
    return target


DEFAULT_CACHE_SUBDIR = "cache/segments"  # under logging.out_dir when segmentation.cache_dir is not set


def absolute_local_paths(config: MegasegConfig) -> MegasegConfig:
    """The config with every local path made absolute (model, tokenizer, data and prompt files, reward model,
    normalizer, output and cache directories), so the config a run saves works from any directory."""
    def absolute(path: Optional[str]) -> Optional[str]:
        if path is None or path.startswith(SHIPPED_PREFIX):
            return path
        return str(Path(path).absolute())

    def replaced(section: object, names: tuple[str, ...]) -> object:
        return dataclasses.replace(section, **{name: absolute(getattr(section, name)) for name in names})

    return dataclasses.replace(
        config, model=replaced(config.model, ("tokenizer", "checkpoint")),
        data=replaced(config.data, ("train_path", "eval_path", "prompt_path", "eval_prompt_path")),
        rm=replaced(config.rm, ("checkpoint",)), normalizer=replaced(config.normalizer, ("path",)),
        segmentation=dataclasses.replace(config.segmentation, cache_dir=absolute(
            config.segmentation.cache_dir or str(Path(config.logging.out_dir) / DEFAULT_CACHE_SUBDIR))),
        logging=replaced(config.logging, ("out_dir",)))
