"""YAML + dotted command-line overrides -> a validated, frozen MegasegConfig; and saving it beside a run.

A YAML file may name another one to start from with a top-level `base: relative/or/absolute.yaml`;
later layers win: schema defaults < base files < the file < command-line `key=value` overrides.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
