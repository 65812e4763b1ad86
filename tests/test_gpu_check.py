"""The GPU check and the GPU benchmarks stop with one line where there is no GPU, instead of hanging or
measuring the CPU under a GPU heading."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=environment)


def test_gpu_check_without_cuda(tmp_path):
    result = run("bash", "benchmarks/gpu_check.sh", env={"PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: CUDA: {sys.executable}'s torch sees no CUDA device; run this on the GPU machine"
    ]
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (
            ["benchmarks.featurise", "--gpu"],
            "error: --gpu: this machine has no CUDA device (torch.cuda.is_available() is False)",
        ),
        (
            ["benchmarks.index", "--gpu", "--sizes", "100"],
            "error: --gpu: this FAISS has no GPU (faiss-cpu, or no CUDA device); install faiss-gpu-cu12",
        ),
    ],
)
def test_gpu_benchmarks_without_a_gpu(arguments, line):
    result = run(sys.executable, "-m", *arguments)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
