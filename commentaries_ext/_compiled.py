"""Loading of the compiled extension and registration of its kernel ops.

C++ kernel ops follow one naming rule: the CPU kernel of kernel op ``X`` is
``torch.ops.commentaries_ext.cpp_X`` and the CUDA C++ kernel ``cuda_X``.
"""
from __future__ import annotations

import importlib

import torch

from . import backend

_error: str | None = None
try:
    _C = importlib.import_module("commentaries_ext._C")
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _error = (
        f"the compiled extension commentaries_ext._C could not be loaded ({exc}); only the "
        "reference (and Triton) backends are available. Rebuild it against the installed torch "
        f"{torch.__version__} with `pip install --no-build-isolation -e .`"
    )


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    return _error


def build_info() -> dict[str, str]:
    """What the compiled extension was built with (empty when it is not loaded)."""
    if _C is None:
        return {}
    text = torch.ops.commentaries_ext.build_info()
    info = dict(item.split("=", 1) for item in text.split(";"))
    if info.get("torch") not in (torch.__version__, None):
        raise ImportError(
            f"commentaries_ext._C was built against torch {info.get('torch')} but torch "
            f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation -e .`"
        )
    return info


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.commentaries_ext, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_kernel_ops(names: tuple[str, ...] | list[str]) -> None:
    """Register the compiled ``cpp_X`` / ``cuda_X`` kernels of each kernel op ``X`` that exists."""
    if _C is None:
        return
    for name in names:
        for prefix, backend_name in (("cpp_", "cpp"), ("cuda_", "cuda")):
            if _has_op(prefix + name):
                backend.register(backend_name, name, getattr(torch.ops.commentaries_ext, prefix + name))
