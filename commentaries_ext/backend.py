"""Which implementation (backend) runs each kernel op.

Every kernel op (``wce_forward``, ``blend_forward``, ``neumann_step`` ...) has
implementations in several backends with the same signature:

* ``reference`` -- plain PyTorch, every device (the oracle of last resort);
* ``cpp``       -- the C++ CPU kernels of the compiled extension;
* ``triton``    -- Triton kernels: CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (tests only, never picked automatically on CPU);
* ``cuda``      -- the CUDA C++ kernels (present when built with CUDA).

By default the fastest available one for the tensor's device is used
(``PREFERENCE``). To force one, for tests and benchmarks::

    with commentaries_ext.backend.use("reference"):
        ...

or set ``COMMENTARIES_EXT_BACKEND=reference`` in the environment. Forcing a
backend that does not implement an op on that device raises an error rather
than quietly running another one.
"""
from __future__ import annotations

import contextvars
import os
from typing import Callable

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")

# Fastest first, per device type; an op's own entry overrides (set where the
# benchmarks show another order, e.g. Triton beating CUDA C++ for one op).
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
OP_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {}

# changed through register() only: lookups elsewhere are cached until `generation` moves
_kernels: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS}
generation = 0  # bumped by every register()
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("commentaries_ext_backend", default=None)


_poison = False


def set_poison_outputs(on: bool) -> bool:
    """Make every kernel output start as NaN (tests); returns the previous setting."""
    global _poison
    previous, _poison = _poison, bool(on)
    try:
        torch.ops.commentaries_ext.set_poison_outputs(bool(on))
    except (AttributeError, RuntimeError):  # compiled extension not loaded
        pass
    return previous


def new_output(*size, like: torch.Tensor | None = None, **options) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (Python backends), poisoned with NaN in tests."""
    if like is not None:
        options = {"dtype": like.dtype, "device": like.device, **options}
    out = torch.empty(*size, **options)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def register(backend: str, op: str, fn: Callable) -> None:
    """Make ``fn`` the ``backend`` implementation of kernel op ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    global generation
    _kernels[backend][op] = fn
    generation += 1


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return False


def forced() -> str | None:
    name = _forced.get() or os.environ.get("COMMENTARIES_EXT_BACKEND") or None
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"COMMENTARIES_EXT_BACKEND={name!r} is not one of {BACKENDS + ('auto',)}")
    return None if name == "auto" else name


class use:
    """Force backend ``name`` (or ``"auto"``): ``with use(name): ...`` inside the block only,
    a plain ``use(name)`` from then on (in this thread or task), as ``torch.set_grad_enabled``."""

    def __init__(self, name: str):
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
        self._token = _forced.set(name)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        _forced.reset(self._token)


def candidates(op: str, device_type: str) -> list[str]:
    """Backends that implement ``op`` on ``device_type``, fastest first."""
    order = OP_PREFERENCE.get((op, device_type), PREFERENCE.get(device_type, ("reference",)))
    extra = [b for b in BACKENDS if b not in order]  # triton on cpu under the interpreter
    return [b for b in list(order) + extra if op in _kernels[b] and _runs_on(b, device_type)]


def select(op: str, device: torch.device | str) -> tuple[str, Callable]:
    """The backend name and implementation that will run ``op`` on ``device``."""
    device_type = torch.device(device).type
    name = forced()
    if name is not None:
        if op not in _kernels[name] or not _runs_on(name, device_type):
            raise RuntimeError(
                f"backend {name!r} was forced but has no {op!r} kernel for {device_type} tensors "
                f"(available: {candidates(op, device_type)})"
            )
        return name, _kernels[name][op]
    # Triton on the CPU is an interpreter for testing, never an automatic choice.
    found = [b for b in candidates(op, device_type) if not (b == "triton" and device_type == "cpu")]
    if not found:
        raise RuntimeError(f"no backend implements {op!r} for {device_type} tensors")
    return found[0], _kernels[found[0]][op]


def kernel(op: str, device: torch.device | str) -> Callable:
    return select(op, device)[1]


def helper_kernel(op: str, device: torch.device | str) -> Callable:
    """:func:`kernel` for the ops that only some backends implement and that other code calls
    along the way (the engine's channel, BatchNorm, col2im and Adam ops): under a forced
    backend that lacks ``op`` for ``device``'s type, the reference runs instead of an error, so
    that forcing a backend to test its kernels (``use("cuda")``) still runs the whole model."""
    name = forced()
    if name is not None and name not in candidates(op, torch.device(device).type):
        return _kernels["reference"][op]
    return kernel(op, device)


def optional_kernel(op: str, like_op: str, device: torch.device | str) -> Callable | None:
    """``op`` of the backend that runs ``like_op`` on ``device``, or None when that backend has
    no such kernel (fused ops that only some backends implement)."""
    return _kernels[select(like_op, device)[0]].get(op)


def report() -> dict[str, dict[str, str]]:
    """For every op: the backend that runs it on each device type here."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = sorted({op for table in _kernels.values() for op in table})
    out: dict[str, dict[str, str]] = {}
    for op in ops:
        out[op] = {}
        for d in devices:
            try:
                out[op][d] = select(op, d)[0]
            except RuntimeError:
                out[op][d] = "-"
    return out
