#!/usr/bin/env python
"""Checkpoint conversion without the `megaseg` entry point; the same code as `megaseg convert`.

    python tools/convert_checkpoint.py gguf-to-hf --out DIR [--gguf FILE_OR_DIR]
    python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out DIR [--tp N] [--pp N]
    python tools/convert_checkpoint.py megatron-to-hf --ckpt DIR --out DIR [--config model.yaml]

See megaseg/conversion/README.md for the output layouts and memory needs.
"""
import sys

from megaseg.cli import main

# The guard matters: dist_checkpointing and the TP*PP conversion ranks start processes that re-import this script.
if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
