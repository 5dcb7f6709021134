"""The ``kernels`` setting: config validation, what each choice runs on CPU, the clear refusal of ``triton`` on CPU
tensors outside Triton's interpreter, and that every command's ``parallel_session`` applies the config's choice."""
import os
import subprocess
import sys

import pytest
import torch

from megaseg.config.loader import load_config
from megaseg.kernels import kernels_mode, select_kernels, selected_kernels, use_triton

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_config_key_is_validated():
    assert load_config().kernels == "torch"  # until the kernels have run on a GPU
    assert load_config(overrides=["kernels=torch"]).kernels == "torch"
    with pytest.raises(ValueError, match=r"kernels='cuda' is not allowed"):
        load_config(overrides=["kernels=cuda"])
    with pytest.raises(ValueError, match=r"kernels='fast'"):
        select_kernels("fast")


def test_each_choice_on_cpu_tensors():
    cpu = torch.zeros(1)
    with kernels_mode("auto"):
        assert not use_triton(cpu)  # auto: torch off CUDA
    with kernels_mode("torch"):
        assert not use_triton(cpu)
    with kernels_mode("triton"):
        if torch.cuda.is_available():  # conftest leaves the interpreter off: CPU tensors are refused
            with pytest.raises(ValueError, match="interpreter"):
                use_triton(cpu)
        else:
            assert use_triton(cpu)
    assert selected_kernels() == "torch"


def test_parallel_session_applies_the_config_choice():
    from megaseg.parallel.initialize import parallel_session

    given_context = object()  # a caller-owned context: parallel_session yields it without initialising anything
    with kernels_mode("auto"):
        with parallel_session(load_config(overrides=["kernels=torch"]), given_context) as context:
            assert context is given_context and selected_kernels() == "torch"


def test_triton_on_cpu_outside_the_interpreter_is_refused_with_the_fix():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = ("import torch\nfrom megaseg.algorithms.advantages import gae\nfrom megaseg.kernels import select_kernels\n"
              "select_kernels('triton')\nmask = torch.ones(1, 3, dtype=torch.bool)\n"
              "gae(torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.0, 0.95, contiguous=True)\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "ValueError: kernels=triton on a cpu tensor runs only in Triton's interpreter" in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr
