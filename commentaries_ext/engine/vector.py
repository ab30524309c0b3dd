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
``axpy_dot_(y, a, x, z) -> Tensor``       y <- y + a*x ; returns <y, z>
``scale(xs, a)``, ``add(xs, ys, alpha)``, ``sub(xs, ys)``, ``clone(xs)``,
``zeros_like(xs)``, ``detach(xs)``, ``isfinite(xs)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

Vec = Sequence[torch.Tensor]

_fused = None  # the ops.solver module once it is importable


def _solver_ops():
    global _fused
    if _fused is None:
        try:
            from ..ops import solver as mod  # type: ignore[attr-defined]

            _fused = mod
        except Exception:  # not written yet / failed to build
            _fused = False
    return _fused or None


def _fused_fn(name: str, xs: Vec):
    """The fused op ``name`` if it exists and supports these tensors, else None."""
    mod = _solver_ops()
    if mod is None or not xs:
        return None
    fn = getattr(mod, name, None)
    if fn is None:
        return None
    t = xs[0]
    if t.dtype not in (torch.float32, torch.float64) or t.requires_grad:
        return None
    return fn


def use_fused(on: bool) -> bool:
    """Enable/disable the fused solver ops (tests, benchmarks); returns the previous setting."""
    global _fused
    previous = bool(_solver_ops())
    if on:
        _fused = None
        _solver_ops()
    else:
        _fused = False
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
    fn = _fused_fn("dot", xs)
    if fn is not None:
        try:
            return fn(list(xs), list(ys))
        except Exception:
            pass
    if len(xs) == 0:
        return torch.zeros(())
    flat_x = [x.reshape(-1) for x in xs]
    flat_y = [y.reshape(-1) for y in ys]
    return torch.stack([torch.dot(a, b) for a, b in zip(flat_x, flat_y)]).sum()


def norm(xs: Vec) -> torch.Tensor:
    fn = _fused_fn("norm", xs)
    if fn is not None:
        try:
            return fn(list(xs))
        except Exception:
            pass
    if len(xs) == 0:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(xs))))


def isfinite(xs: Vec) -> bool:
    return bool(torch.isfinite(norm(xs)))


def axpy_(ys: Vec, a, xs: Vec) -> None:
    torch._foreach_add_(list(ys), list(xs), alpha=float(a)) if not torch.is_tensor(a) else torch._foreach_add_(
        list(ys), torch._foreach_mul(list(xs), a)
    )


def axpy_dot_(ys: Vec, a, xs: Vec, zs: Vec) -> torch.Tensor:
    """``y <- y + a x`` in place; returns ``<y, z>``."""
    fn = _fused_fn("axpy_dot_", ys) or _fused_fn("axpy_dot", ys)
    if fn is not None:
        try:
            return fn(list(ys), float(a), list(xs), list(zs))
        except Exception:
            pass
    axpy_(ys, a, xs)
    return dot(ys, zs)


def neumann_step_(c: Vec, p: Vec, h: Vec, alpha: float) -> None:
    """``c <- c - alpha*h ; p <- p + c`` in place (one fused pass when available)."""
    fn = _fused_fn("neumann_step_", c) or _fused_fn("neumann_step", c)
    if fn is not None:
        try:
            fn(list(c), list(p), list(h), float(alpha))
            return
        except Exception:
            pass
    torch._foreach_add_(list(c), list(h), alpha=-float(alpha))
    torch._foreach_add_(list(p), list(c))
