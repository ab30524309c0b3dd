"""Plain-PyTorch masked blending kernels (backend ``reference``).

Same signatures as the other backends; see ``commentaries_ext/ops/blend.py``
for the contract.  Every device and floating dtype.
"""
from __future__ import annotations

import torch

from .. import backend


def _partner(x_a: torch.Tensor, x_b: torch.Tensor | None, perm: torch.Tensor | None) -> torch.Tensor:
    src = x_a if x_b is None else x_b
    return src if perm is None else src.index_select(0, perm)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def blend_forward(x_a: torch.Tensor, m: torch.Tensor, x_b: torch.Tensor | None, perm: torch.Tensor | None) -> torch.Tensor:
    xb = _partner(x_a, x_b, perm)
    acc = _acc(x_a)
    mm = m.to(acc)
    res = mm * x_a.to(acc) + (1 - mm) * xb.to(acc)
    out = torch.empty_like(x_a)
    out.copy_(res)
    return out


def blend_backward(grad: torch.Tensor, x_a: torch.Tensor, m: torch.Tensor, x_b: torch.Tensor | None,
                   perm: torch.Tensor | None, output_mask: list[bool]):
    acc = _acc(x_a)
    g = grad.to(acc)
    mm = m.to(acc)
    empty = x_a.new_empty(0)
    gxa_out, gxb_out, gm_out = empty, x_a.new_empty(0), x_a.new_empty(0)
    partner_grad = g * (1 - mm)
    if output_mask[0]:
        gxa = g * mm
        if perm is not None and x_b is None:
            gxa = gxa.index_add(0, perm, partner_grad)
        gxa_out = torch.empty_like(x_a)
        gxa_out.copy_(gxa)
    if output_mask[1] and x_b is not None:
        if perm is None:
            gxb = partner_grad
        else:
            gxb = torch.zeros(x_b.shape, dtype=acc, device=x_b.device).index_add_(0, perm, partner_grad)
        gxb_out = torch.empty_like(x_b)
        gxb_out.copy_(gxb)
    if output_mask[2]:
        xb = _partner(x_a, x_b, perm).to(acc)
        prod = g * (x_a.to(acc) - xb)
        dims = [d for d in range(x_a.dim()) if m.shape[d] == 1 and x_a.shape[d] != 1]
        gm = prod.sum(dim=dims, keepdim=True) if dims else prod
        gm_out = torch.empty(m.shape, dtype=m.dtype, device=m.device)
        gm_out.copy_(gm.reshape(m.shape))
    return gxa_out, gxb_out, gm_out


def blend_backward_differentiable(grad, x_a, m, x_b, perm, needs):
    """The backward as differentiable PyTorch ops (double backward)."""
    gxa = gxb = gm = None
    partner_grad = grad * (1 - m)
    if needs[0]:
        gxa = grad * m
        if perm is not None and x_b is None:
            gxa = gxa.index_add(0, perm, partner_grad)
    if needs[1] and x_b is not None:
        gxb = partner_grad if perm is None else torch.zeros_like(x_b).index_add(0, perm, partner_grad)
    if needs[2]:
        xb = _partner(x_a, x_b, perm)
        prod = grad * (x_a - xb)
        dims = [d for d in range(x_a.dim()) if m.shape[d] == 1 and x_a.shape[d] != 1]
        gm = (prod.sum(dim=dims, keepdim=True) if dims else prod).reshape(m.shape)
    return gxa, gxb, gm


backend.register("reference", "blend_forward", blend_forward)
backend.register("reference", "blend_backward", blend_backward)
