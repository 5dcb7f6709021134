#!/usr/bin/env bash
# One command for a GPU machine with this repository: set up, run every `gpu` test and the kernel tests on CUDA, the
# kernel and vocab-parallel benchmarks, and print one JSON summary as the last line; about 10 minutes at most.
#
#   bash scripts/gpu_check.sh            # logs and per-step outputs in gpu_check_out/ (GPU_CHECK_OUT=DIR to move)
#
# Set-up: scripts/setup_env.sh pins the CPU torch wheel, which is wrong here. This script makes .venv-gpu on top of
# the machine's own CUDA torch (--system-site-packages; PYTHON=... picks the interpreter), installs megaseg into it
# without touching torch, and then tries to add what is missing (megatron-core, triton, pytest, hypothesis, ...): an
# offline machine skips that step, and the summary says which imports are missing. TransformerEngine is used when the
# machine has it; the TE tests skip (and the summary counts them) when it does not.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
step() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }

[ -x .venv-gpu/bin/python ] || "$PYTHON" -m venv --system-site-packages .venv-gpu
PY=.venv-gpu/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$OUT/torch.log"; then
    echo "{\"gpu_check\": \"failed\", \"reason\": \"no CUDA torch in $PYTHON's site packages (see $OUT/torch.log)\"}"
    exit 1
fi
step "installing megaseg (editable, no dependencies) and what is missing"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1
# Everything setup.py needs except torch, which must stay the machine's CUDA build.
timeout 240 "$PY" -m pip install -q --disable-pip-version-check "megatron-core>=0.16.1" "omegaconf>=2.3" numpy \
    scikit-learn transformers tokenizers datasets safetensors gguf tqdm tensorboard matplotlib psutil pyyaml \
    pytest pytest-timeout hypothesis triton >>"$OUT/pip.log" 2>&1 && PIP=ok || PIP="failed (offline?): see $OUT/pip.log"

step "pytest -m gpu"
timeout 300 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
step "kernel tests on CUDA"
timeout 150 "$PY" -m pytest -q tests/kernels -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml" >"$OUT/kernel_tests.log" 2>&1
step "benchmarks/kernels.py"
timeout 120 "$PY" benchmarks/kernels.py --quick >"$OUT/kernels_benchmark.log" 2>&1
step "benchmarks/vocab_parallel.py"
# A CPU/gloo memory benchmark by design (peak resident memory per rank): GPUs hidden, so it does not pick nccl.
CUDA_VISIBLE_DEVICES= timeout 90 "$PY" benchmarks/vocab_parallel.py --positions 512 --vocab 32000 >"$OUT/vocab_parallel_benchmark.log" 2>&1

PIP="$PIP" OUT="$OUT" START="$START" "$PY" - <<'PYEOF'
import json, os, time, importlib.util
import xml.etree.ElementTree as ET
import torch

out = os.environ["OUT"]

def junit(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return {"ran": False}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}

def last_json(name):
    path = os.path.join(out, name)
    try:
        lines = [line for line in open(path).read().splitlines() if line.strip()]
        return json.loads(lines[-1])
    except Exception as error:  # a crashed or timed-out benchmark: say so in the summary
        return {"error": f"no JSON last line in {path}: {type(error).__name__}"}

summary = {
    "gpu_check": "done",
    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    "missing_imports": [m for m in ("megatron.core", "triton", "transformer_engine", "pytest", "hypothesis")
                        if importlib.util.find_spec(m.split(".")[0]) is None],
    "pip": os.environ["PIP"],
    "gpu_tests": junit("gpu_tests.xml"), "kernel_tests": junit("kernel_tests.xml"),
    "kernels_benchmark": last_json("kernels_benchmark.log"),
    "vocab_parallel_benchmark": last_json("vocab_parallel_benchmark.log"),
    "seconds": round(time.time() - float(os.environ["START"]), 1),
}
print(json.dumps(summary))
PYEOF
