"""The benchmark and experiment scripts under python/ run end to end at tiny sizes.

They are run by hand (BENCHMARKS.md, RESULTS.md) and otherwise by nothing, so a
change to the library can break them unnoticed (session 20 found the GPU
benchmark unable to import the in-place build). Each runs in a subprocess, one
thread, and must exit 0 and print its table; the figures are not checked here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")


def run_script(*args: str, expect_rc: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the scripts time real backends, never the interpreter
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, f"{args[0]} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def test_bench_cross_entropy():
    out = run_script("python/bench_cross_entropy.py", "--backends", "cpp", "--repeats", "2", "--n", "64",
                     "--classes", "10,100", "--no-compile")
    assert "C=100 fwd+bwd bandwidth" in out and "hvp_ms/cpp" in out


def test_bench_blend_solver():
    out = run_script("python/bench_blend_solver.py", "--no-compile", "--rounds", "2", "--inner", "1",
                     "--params", "100000")
    assert "masked_blend" in out and "fused cg_update_ (cpp)" in out


def test_bench_engine_paths():
    out = run_script("python/bench_engine_paths.py", "--rounds", "1", "--threads", "1")
    assert "reuse_cpu_memory" in out


@pytest.mark.slow
def test_bench_hypergrad():
    out = run_script("python/bench_hypergrad.py", "--students", "mlp", "--K", "1", "--T", "2,3", "--rounds", "1",
                     "--bptt-rounds", "1", "--threads", "1")
    assert "engine" in out and "memory per unrolled step" in out


def test_bench_gpu_kernels_refuses_without_gpu():
    pytest.importorskip("triton")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check runs this benchmark")
    out = run_script("python/bench_gpu_kernels.py", "--only", "cross_entropy", expect_rc=2)
    assert "needs a CUDA GPU" in out


@pytest.fixture(scope="module")
def exp_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@needs_fmnist
@pytest.mark.slow
def test_experiments_quick(exp_dirs):
    """Experiments 1-3 at --quick sizes, then experiment 4 on their commentary files."""
    for name in ("weighting", "blending", "masks"):
        out = run_script(f"python/exp_{name}.py", "--quick", "--seeds", "0", "--out", str(exp_dirs / name))
        assert (exp_dirs / name / "results.json").is_file() and (exp_dirs / name / "summary.md").is_file(), out
        assert list((exp_dirs / name).glob("*.commentary")), f"exp_{name} saved no commentary"
        assert list((exp_dirs / name).glob("*.png")), f"exp_{name} drew no figure"
    out = run_script("python/exp_reuse.py", "--quick", "--seeds", "0", "--exp1", str(exp_dirs / "weighting"),
                     "--exp2", str(exp_dirs / "blending"), "--out", str(exp_dirs / "reuse"))
    assert "weighting (BPTT)" in out and "blending (IFT)" in out
