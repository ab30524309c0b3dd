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


def adam_step(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2):
    """``(p', m', v')`` of ``torch.optim.Adam``'s step, with its arithmetic (its foreach ops)."""
    m_new = torch._foreach_lerp(m, g, 1 - beta1)
    v_new = torch._foreach_mul(v, beta2)
    torch._foreach_addcmul_(v_new, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(v_new)
    torch._foreach_div_(denom, bc2**0.5)
    torch._foreach_add_(denom, eps)
    p_new = torch._foreach_addcdiv(p, m_new, denom, value=-(lr / bc1))
    return p_new, m_new, v_new


def adam_step_backward(gp, gm, gv, g, m, v, lr, beta1, beta2, eps, bc1, bc2, output_mask):
    """Reverse mode of :func:`adam_step` for incoming ``gp, gm, gv`` (lists with None for zero),
    from ``g`` and the step's outputs ``m = m'``, ``v = v'``; ``(dg, dm, dv)``, each an empty list
    unless asked for.  Built from differentiable ops (a double backward goes through it)::

        q = P / d,  M~ = M - (lr / bc1) q,  V~ = V + q m' / (d sqrt(v')) lr / (bc1 2 sqrt(bc2))  (0 at v' = 0)
        dg = (1 - b1) M~ + 2 (1 - b2) g V~,  dm = b1 M~,  dv = b2 V~
    """
    k = len(g)
    a, rs = lr / bc1, bc2**0.5
    M, V = list(gm), list(gv)
    for i in range(k):
        if gp[i] is None:
            continue
        # the paths through p' = p - a m' / d. Where v' = 0, sqrt has no derivative (taken as 0): the
        # divisor goes through where() too, so that a double backward sees no 0/0 there either
        pos = v[i] > 0
        sq = torch.sqrt(torch.where(pos, v[i], torch.ones_like(v[i])))
        d = torch.where(pos, sq, torch.zeros_like(sq)) / rs + eps
        q = gp[i] / d
        dm = q * -a
        dv = torch.where(pos, q * m[i] / d / sq * (a / (2 * rs)), torch.zeros_like(q))
        M[i] = dm if M[i] is None else M[i] + dm
        V[i] = dv if V[i] is None else V[i] + dv
    Mt = [M[i] if M[i] is not None else torch.zeros_like(g[i]) for i in range(k)]
    Vt = [V[i] if V[i] is not None else torch.zeros_like(g[i]) for i in range(k)]
    dg = [torch.addcmul((1 - beta1) * Mt[i], g[i], Vt[i], value=2 * (1 - beta2)) for i in range(k)] \
        if output_mask[0] else []
    dmo = [beta1 * t for t in Mt] if output_mask[1] else []
    dvo = [beta2 * t for t in Vt] if output_mask[2] else []
    return dg, dmo, dvo


backend.register("reference", "neumann_step", neumann_step)
backend.register("reference", "adam_step", adam_step)
backend.register("reference", "adam_step_backward", adam_step_backward)
backend.register("reference", "axpy_dot", axpy_dot)
backend.register("reference", "cg_update", cg_update)
backend.register("reference", "multi_dot", multi_dot)
