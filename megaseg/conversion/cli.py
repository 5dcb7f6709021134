"""`megaseg convert <direction>`: check which flags a direction takes, then call its converter."""
from __future__ import annotations

import logging
from typing import Optional

from megaseg.config.root import MegasegConfig

logger = logging.getLogger(__name__)

# direction -> (required flags, optional flags)
DIRECTIONS = {
    "gguf-to-hf": (("out",), ("gguf",)),
    "hf-to-megatron": (("hf", "out"), ("tp", "pp")),
    "megatron-to-hf": (("ckpt", "out"), ()),
}


def _check_flags(direction: str, given: dict) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown conversion {direction!r}; choose one of {list(DIRECTIONS)}")
    required, optional = DIRECTIONS[direction]
    missing = [f"--{name}" for name in required if given.get(name) is None]
    if missing:
        raise ValueError(f"convert {direction} needs {' and '.join(missing)}")
    extra = [f"--{name}" for name, value in given.items()
             if value is not None and name not in required + optional]
    if extra:
        raise ValueError(f"convert {direction} does not take {', '.join(extra)}")


def convert_command(config: MegasegConfig, direction: str, explicit_keys: frozenset[str] = frozenset(),
                    hf: Optional[str] = None, ckpt: Optional[str] = None, gguf: Optional[str] = None,
                    out: Optional[str] = None, tp: Optional[int] = None, pp: Optional[int] = None) -> int:
    """Entry point of `megaseg convert`; `config.model` is consulted only by megatron-to-hf, and only when the
    checkpoint has no megaseg_model.yaml / config.yaml beside or above it."""
    _check_flags(direction, {"hf": hf, "ckpt": ckpt, "gguf": gguf, "out": out, "tp": tp, "pp": pp})
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if direction == "gguf-to-hf":
        from megaseg.conversion.gguf_to_hf import convert_gguf_to_hf

        written = convert_gguf_to_hf(gguf, out)
    elif direction == "hf-to-megatron":
        from megaseg.conversion.hf_to_megatron import convert_hf_to_megatron

        written = convert_hf_to_megatron(hf, out, tp=tp if tp is not None else 1, pp=pp if pp is not None else 1)
    else:
        from megaseg.conversion.megatron_to_hf import convert_megatron_to_hf

        written = convert_megatron_to_hf(ckpt, out, model_cfg=config.model)
    print(written)
    return 0
