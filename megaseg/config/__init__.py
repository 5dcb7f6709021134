"""Typed configuration: dataclass sections validated on load, YAML + dotted overrides, saved with every run."""
from megaseg.config.loader import config_to_yaml, load_config, save_config
from megaseg.config.root import MegasegConfig

__all__ = ["MegasegConfig", "load_config", "save_config", "config_to_yaml"]
