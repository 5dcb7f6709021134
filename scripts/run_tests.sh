#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
