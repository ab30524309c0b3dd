"""Build of the commentaries_ext C++/CUDA extension.

The source lists and flags live in csrc/build.json (shared with CMakeLists.txt).
The extension is built against the torch that is installed: install with
``pip install --no-build-isolation -e .`` so that pip does not build against a
different torch in an isolated environment.
"""
import json
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup


def _set_cuda_home() -> None:
    # torch.utils.cpp_extension fixes CUDA_HOME when it is imported, from the
    # nvcc on PATH. When that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc
    # exec'ing /usr/local/cuda-13.0/bin/nvcc) its parent is no CUDA toolkit, so
    # point CUDA_HOME at the toolkit that has the headers and libraries.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        try:  # a wrapper script names the real nvcc
            text = Path(nvcc).read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for word in text.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


_set_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent
CONFIG = json.loads((ROOT / "csrc" / "build.json").read_text())


# cpuinfo flags each instruction set of csrc/build.json "cxx_simd_flags" needs
_SIMD_CPU_FLAGS = {"avx2": ("avx2", "fma"), "avx512": ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl")}


def _simd_level() -> str:
    """The instruction set to compile the CPU kernels for: the best the building machine has.

    The extension is built for the machine that builds it (like a source build of any
    native package). COMMENTARIES_EXT_SIMD=none|avx2|avx512 asks for a level (one the
    CPU lacks is refused: the module would not load); COMMENTARIES_EXT_NO_SIMD=1 is none."""
    want = os.environ.get("COMMENTARIES_EXT_SIMD", "").strip().lower()
    if os.environ.get("COMMENTARIES_EXT_NO_SIMD"):
        want = "none"
    if want and want != "none" and want not in _SIMD_CPU_FLAGS:
        raise SystemExit(f"COMMENTARIES_EXT_SIMD={want!r}: expected one of none, avx2, avx512")
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        have = set()
    usable = [lvl for lvl, need in _SIMD_CPU_FLAGS.items() if all(f in have for f in need)]
    if want == "none":
        return "none"
    if want:
        if want not in usable:
            raise SystemExit(f"COMMENTARIES_EXT_SIMD={want}: this CPU lacks {_SIMD_CPU_FLAGS[want]}")
        return want
    return usable[-1] if usable else "none"


def _want_cuda() -> bool:
    if os.environ.get("COMMENTARIES_EXT_NO_CUDA"):
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None and bool(CONFIG["cuda_sources"])


def extensions():
    cxx = list(CONFIG["cxx_flags"])
    simd = _simd_level()
    if simd != "none":
        cxx += CONFIG["cxx_simd_flags"][simd]
    sources = list(CONFIG["cpu_sources"])
    macros = []
    if _want_cuda():
        sources += CONFIG["cuda_sources"]
        macros.append(("COMMENTARIES_EXT_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": list(CONFIG["nvcc_flags"])}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    # Record what was built so that `commentaries_ext.build_info()` can report it.
    macros.append(("COMMENTARIES_EXT_TORCH_VERSION", '"%s"' % torch.__version__))
    return [
        ext_cls(
            "commentaries_ext._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


setup(
    name="commentaries_ext",
    version="0.1.0",
    description="Teaching with Commentaries (ICLR 2021) as a PyTorch extension",
    packages=find_packages(include=["commentaries_ext", "commentaries_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "scikit-learn", "expecttest"],
        "triton": ["triton"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["commentaries=commentaries_ext.cli:main"]},
)
