"""List-of-tensor arithmetic used by the solvers (the engine's one interface to
the fused solver-update kernels).

Every function takes lists (or tuples) of tensors that play the role of one
flattened vector.  When the fused ops of ``commentaries_ext.ops.solver`` are
present they are used for the dtypes/devices they support; otherwise (or for
other dtypes) the ``torch._foreach_*`` fallback below runs.  The results are
the same up to floating-point summation order.

Functions
---------
``dot(xs, ys) -> Tensor``                 sum_i <x_i, y_i>      (0-dim tensor)
``norm(xs) -> Tensor``                    sqrt(dot(xs, xs))
``neumann_step_(c, p, h, alpha)``         c <- c - alpha*h ; p <- p + c  (in place)
``axpy_(y, a, x)``                        y <- y + a*x          (in place)
``axpy_dot_(y, a, x, z=None) -> Tensor``  y <- y + a*x ; returns <y, z> (z None: <y, y>)
``cg_update_(x, r, d, q, a) -> Tensor``   x <- x + a*d ; r <- r - a*q ; returns <r, r>
``scale(xs, a)``, ``add(xs, ys, alpha)``, ``sub(xs, ys)``, ``clone(xs)``,
``zeros_like(xs)``, ``detach(xs)``, ``isfinite(xs)``.
"""
from __future__ import annotations

from typing import Sequence

import math
import time

import torch

from .. import distributed

Vec = Sequence[torch.Tensor]

_fused = None  # the ops.solver module once it is importable


def _solver_ops():
    global _fused
    if _fused is None:
        try:
            from ..ops import solver as mod

            _fused = mod
        except Exception:  # the compiled/registered ops are unavailable: use the foreach path
            _fused = False
    return _fused or None


def _supported(*lists) -> bool:
    """Whether the fused kernels take these lists: contiguous float32/float64 CPU tensors of
    one dtype and device, no autograd (the solvers run on detached buffers). On a GPU the
    engine keeps the ``torch._foreach`` path: the Triton/CUDA solver kernels have not yet run on
    one (their tests skip without a GPU), and ``best_seconds`` would need a synchronisation
    there; ``ops.solver``'s public functions do use them."""
    first = lists[0][0] if lists and lists[0] else None
    if first is None or first.dtype not in (torch.float32, torch.float64) or first.device.type != "cpu":
        return False
    for xs in lists:
        for t in xs:
            if t.dtype != first.dtype or t.device != first.device or t.requires_grad or not t.is_contiguous():
                return False
    return True


def _fused_fn(name: str, *lists):
    """The fused op ``name`` when present, applicable to these lists and not slower
    than the ``torch._foreach`` path on them (timed once per op and shapes: a
    kernel regression must not slow the solvers down), else None.  Under
    ``torch.use_deterministic_algorithms(True)`` or torch.distributed nothing is timed and the
    fused op is used (a timing-based choice changes the summation order from run to run, and
    could differ between ranks); the
    choices made are saved with a checkpoint (``commentaries_ext.checkpoint``)."""
    mod = _solver_ops()
    if mod is None or not _supported(*lists):
        return None
    fn = getattr(mod, name, None)
    if fn is None or not CALIBRATE or not timing_allowed():
        return fn
    key = (name, lists[0][0].dtype, tuple(tuple(t.shape) for t in lists[0]))
    choice = _choice.get(key)
    if choice is None:
        choice = _calibrate(name, fn, lists[0])
        _choice[key] = choice
    return fn if choice else None


CALIBRATE = True
_choice: dict = {}


def _calibrate(name, fn, like) -> bool:
    a = [torch.zeros_like(t) for t in like]
    b = [torch.zeros_like(t) for t in like]
    c = [torch.zeros_like(t) for t in like]
    d = [torch.zeros_like(t) for t in like]
    calls = {
        "neumann_step_": (lambda: fn(a, b, c, 0.5), lambda: (torch._foreach_add_(a, c, alpha=-0.5), torch._foreach_add_(b, a))),
        "axpy_dot_": (lambda: fn(a, 0.5, b, c), lambda: (torch._foreach_add_(a, b, alpha=0.5), _dot_foreach(a, c))),
        "cg_update_": (lambda: fn(a, b, c, d, 0.5), lambda: (torch._foreach_add_(a, c, alpha=0.5), torch._foreach_add_(b, d, alpha=-0.5), _dot_foreach(b, b))),
        "dot": (lambda: fn(a, b), lambda: _dot_foreach(a, b)),
        "norm": (lambda: fn(a), lambda: _dot_foreach(a, a)),
    }
    if name not in calls:
        return True
    fused, plain = calls[name]
    try:
        return best_seconds(fused) <= 1.5 * best_seconds(plain)
    except Exception:
        return False


def timing_allowed() -> bool:
    """Whether the engine may choose kernels by timing them (``_fused_fn``, ``conv.fold_is_faster``):
    not under ``torch.use_deterministic_algorithms(True)`` (a timed choice changes the rounding
    from run to run) nor under torch.distributed (ranks could choose differently)."""
    return not torch.are_deterministic_algorithms_enabled() and not distributed.enabled()


def best_seconds(f, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``f`` after one warm-up call (one-time
    choices between two implementations)."""
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _dot_foreach(xs, ys):
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]).sum()


def use_fused(on: bool) -> bool:
    """Enable/disable the fused solver ops (tests, benchmarks); returns the previous setting."""
    global _fused
    previous = bool(_solver_ops())
    _fused = None if on else False
    _choice.clear()
    if on:
        _solver_ops()
    return previous


def fused_available() -> bool:
    return _solver_ops() is not None


# --------------------------------------------------------------------------- basic


def clone(xs: Vec) -> list[torch.Tensor]:
    return [x.detach().clone() for x in xs]


def detach(xs: Vec) -> list[torch.Tensor]:
    return [x.detach() for x in xs]


def zeros_like(xs: Vec) -> list[torch.Tensor]:
    return [torch.zeros_like(x) for x in xs]


def scale(xs: Vec, a) -> list[torch.Tensor]:
    return list(torch._foreach_mul(list(xs), a))


def add(xs: Vec, ys: Vec, alpha=1.0) -> list[torch.Tensor]:
    return list(torch._foreach_add(list(xs), list(ys), alpha=alpha))


def sub(xs: Vec, ys: Vec) -> list[torch.Tensor]:
    return list(torch._foreach_sub(list(xs), list(ys)))


def dot(xs: Vec, ys: Vec) -> torch.Tensor:
    xs, ys = list(xs), list(ys)
    fn = _fused_fn("dot", xs, ys)
    if fn is not None:
        return fn(xs, ys)
    if len(xs) == 0:
        return torch.zeros(())
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(xs, ys)]).sum()


def norm(xs: Vec) -> torch.Tensor:
    xs = list(xs)
    fn = _fused_fn("norm", xs)
    if fn is not None:
        return fn(xs)
    if len(xs) == 0:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))


def isfinite(xs: Vec) -> bool:
    """Whether every element is finite (None entries and empty tensors skipped).  One fused pass
    first: when the sum of squares is finite, every element is (``torch.isfinite`` writes a bool
    tensor, ~60 us per 0.8 MB on the CPU: 0.5 ms of a 9 ms MLP hyper-step); the exact elementwise
    check only when that sum is not (a real NaN/Inf, or finite values whose squares overflow)."""
    xs = [x for x in xs if x is not None and x.numel()]
    if not xs:
        return True
    if math.isfinite(float(dot(xs, xs))):
        return True
    return all(bool(torch.isfinite(x).all()) for x in xs)


def axpy_(ys: Vec, a, xs: Vec) -> None:
    if torch.is_tensor(a):
        torch._foreach_add_(list(ys), torch._foreach_mul(list(xs), a))
    else:
        torch._foreach_add_(list(ys), list(xs), alpha=float(a))


def axpy_dot_(ys: Vec, a, xs: Vec, zs: Vec | None = None) -> torch.Tensor:
    """``y <- y + a x`` in place; returns ``<y, z>`` (``z`` None: ``<y, y>``)."""
    ys, xs = list(ys), list(xs)
    zl = None if zs is None or zs is ys else list(zs)
    fn = _fused_fn("axpy_dot_", ys, xs, *([zl] if zl else []))
    if fn is not None:
        return fn(ys, a, xs, zl)
    axpy_(ys, a, xs)
    return dot(ys, ys if zl is None else zl)


def cg_update_(x: Vec, r: Vec, d: Vec, q: Vec, a) -> torch.Tensor:
    """``x <- x + a d ; r <- r - a q``; returns ``<r, r>``."""
    x, r, d, q = list(x), list(r), list(d), list(q)
    fn = _fused_fn("cg_update_", x, r, d, q)
    if fn is not None:
        return fn(x, r, d, q, a)
    axpy_(x, a, d)
    axpy_(r, -a, q)
    return dot(r, r)


def neumann_step_(c: Vec, p: Vec, h: Vec, alpha: float) -> None:
    """``c <- c - alpha*h ; p <- p + c`` in place (one fused pass when available)."""
    c, p, h = list(c), list(p), list(h)
    fn = _fused_fn("neumann_step_", c, p, h)
    if fn is not None:
        fn(c, p, h, alpha)
        return
    torch._foreach_add_(c, h, alpha=-float(alpha))
    torch._foreach_add_(p, c)
