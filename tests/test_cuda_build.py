"""The CUDA sources compile (no GPU needed), so CUDA code that does not build cannot land.

* every ``csrc/cuda/*.cu`` is compiled with ``nvcc -c`` (skipped only without nvcc);
* every CUDA source and binding is listed in ``csrc/build.json``;
* the bindings (torch headers) compile against a CUDA-enabled torch when one is
  installed (``COMMENTARIES_EXT_CUDA_TORCH=/path/to/site-packages/torch``, or the
  installed torch when it has CUDA); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
BINDINGS = sorted(CUDA_DIR.glob("*_binding.cpp"))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
ARCH = os.environ.get("COMMENTARIES_EXT_NVCC_ARCH", "sm_90")


def _cuda_include() -> Path | None:
    if NVCC is None:
        return None
    for base in (Path(NVCC).resolve().parent.parent, Path("/usr/local/cuda")):
        if (base / "include" / "cuda_runtime.h").exists():
            return base / "include"
    return None


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu found"


def test_build_json_lists_every_cuda_source():
    config = json.loads((ROOT / "csrc" / "build.json").read_text())
    listed = set(config["cuda_sources"])
    for f in CU_FILES + BINDINGS:
        rel = f.relative_to(ROOT).as_posix()
        assert rel in listed, f"{rel} is not in csrc/build.json cuda_sources"
    for rel in listed:
        assert (ROOT / rel).exists(), f"csrc/build.json lists {rel}, which does not exist"


def test_cu_files_include_no_torch_headers():
    # The CPU torch wheel's CUDA headers are incomplete: kernels are plain CUDA.
    for f in CU_FILES + sorted(CUDA_DIR.glob("*.h")) + sorted(CUDA_DIR.glob("*.cuh")):
        if f.name == "binding_common.h":
            continue
        text = f.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{f.name} includes a torch header ({banned}); only *_binding.cpp may"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CU_FILES, ids=[f.name for f in CU_FILES])
def test_cu_compiles_with_nvcc(source, tmp_path):
    flags = json.loads((ROOT / "csrc" / "build.json").read_text())["nvcc_flags"]
    # the macros torch's BuildExtension passes to nvcc (no implicit half/bfloat16 conversions)
    torch_macros = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    cmd = [NVCC, "-c", f"-arch={ARCH}", *flags, *torch_macros, "-I", str(ROOT / "csrc"), "-I", str(CUDA_DIR),
           str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


def _cuda_torch_dir() -> Path | None:
    env = os.environ.get("COMMENTARIES_EXT_CUDA_TORCH")
    if env:
        return Path(env)
    try:
        import torch
    except ImportError:
        return None
    if torch.version.cuda is None:
        return None
    return Path(torch.__file__).parent


@pytest.mark.skipif(_cuda_torch_dir() is None or NVCC is None,
                    reason="needs a CUDA-enabled torch (set COMMENTARIES_EXT_CUDA_TORCH) and nvcc")
@pytest.mark.parametrize("source", BINDINGS, ids=[f.name for f in BINDINGS])
def test_binding_compiles_against_cuda_torch(source, tmp_path):
    tdir = _cuda_torch_dir()
    inc = _cuda_include()
    cmd = ["g++", "-std=c++20", "-fPIC", "-fsyntax-only", "-I", str(ROOT / "csrc"), "-I", str(CUDA_DIR),
           "-I", str(tdir / "include"), "-I", str(tdir / "include" / "torch" / "csrc" / "api" / "include")]
    if inc is not None:
        cmd += ["-I", str(inc)]
    cmd.append(str(source))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


def test_gpu_check_script_parses_and_refuses_without_a_gpu(tmp_path):
    """scripts/gpu_check (the one-shot check for a lent GPU machine) is valid bash, and without a
    GPU it writes what it found and stops with a message instead of timing CPU kernels."""
    script = ROOT / "scripts" / "gpu_check"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if _torch_has_gpu():
        pytest.skip("a GPU is present: the script would run its phases")
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ALLOW_CPU"}
    env["OUT"] = str(tmp_path)
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA GPU here" in res.stdout
    assert "torch" in (tmp_path / "env.txt").read_text()


def _torch_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
