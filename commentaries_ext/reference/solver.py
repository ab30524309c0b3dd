"""Plain-PyTorch solver-update kernels (backend ``reference``).

Same signatures as the other backends; see ``commentaries_ext/ops/solver.py``
for the contract.  Lists of tensors; scalars are 0-dim tensors.
"""
from __future__ import annotations

import torch

from .. import backend


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _sum_dots(xs, ys) -> torch.Tensor:
    acc = _acc(xs[0])
    total = torch.zeros((), dtype=torch.float64, device=xs[0].device)
    for x, y in zip(xs, ys):
        total += torch.dot(x.reshape(-1).to(torch.float64), y.reshape(-1).to(torch.float64))
    return total.to(acc)


def neumann_step(c: list[torch.Tensor], p: list[torch.Tensor], h: list[torch.Tensor], alpha: torch.Tensor) -> None:
    a = alpha.to(device=c[0].device)
    for ci, pi, hi in zip(c, p, h):
        acc = _acc(ci)
        new_c = ci.to(acc) - a.to(acc) * hi.to(acc)
        ci.copy_(new_c)
        pi.copy_(pi.to(acc) + ci.to(acc))


def axpy_dot(y: list[torch.Tensor], a: torch.Tensor, x: list[torch.Tensor], z: list[torch.Tensor]) -> torch.Tensor:
    av = a.to(device=y[0].device)
    for yi, xi in zip(y, x):
        acc = _acc(yi)
        yi.copy_(yi.to(acc) + av.to(acc) * xi.to(acc))
    return _sum_dots(y, y if not z else z)


def cg_update(x: list[torch.Tensor], r: list[torch.Tensor], d: list[torch.Tensor], q: list[torch.Tensor],
              a: torch.Tensor) -> torch.Tensor:
    av = a.to(device=x[0].device)
    for xi, ri, di, qi in zip(x, r, d, q):
        acc = _acc(xi)
        xi.copy_(xi.to(acc) + av.to(acc) * di.to(acc))
        ri.copy_(ri.to(acc) - av.to(acc) * qi.to(acc))
    return _sum_dots(r, r)


def multi_dot(x: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
    return _sum_dots(x, x if not y else y)


backend.register("reference", "neumann_step", neumann_step)
backend.register("reference", "axpy_dot", axpy_dot)
backend.register("reference", "cg_update", cg_update)
backend.register("reference", "multi_dot", multi_dot)
