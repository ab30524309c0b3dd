"""A linear layer whose weight gradient is registered as recomputable (engine/recompute.py).

In an unrolled inner loop the optimiser step keeps each step's gradient; for an MLP the
weight gradients are most of it, a parameter-sized set per step.  ``gW = gyᵀ x`` is a
product of two batch-sized tensors that the double-backward graph keeps anyway, so within
:class:`~.recompute.recompute_cheap` it is kept as that recipe.  The products are the ones
the stock backward computes (``mm``); a meta-gradient through them differs from the stock
graph's only by float rounding (the stock double backward orders some products
differently).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._transforms import dual_level_active, functorch_active
from . import recompute
from .rules import RuleMode


def _weight_grad(gy, x):
    return gy.t().mm(x)


class LinearRules(torch.autograd.Function):
    """``F.linear`` of a 2-D input; backward ``gy W``, ``gyᵀ x`` (registered), ``Σ gy``."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gy.mm(w) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(gy, x)
            recompute.register(gw, _weight_grad, gy, x)
        gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class linear_rules(RuleMode):
    """Within this context and an open :class:`~.recompute.recompute_cheap`, ``F.linear`` of a 2-D
    floating input with a weight of at least ``recompute.MIN_BYTES`` runs through
    :class:`LinearRules`; ``calls`` counts them."""

    FUNCS = (F.linear,)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and recompute.active() and torch.is_grad_enabled() and not functorch_active() \
                and not dual_level_active():
            names = ("input", "weight", "bias")
            a = dict(zip(names, args))
            a.update(kwargs)
            x, w, b = a.get("input"), a.get("weight"), a.get("bias")
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2 and w.dim() == 2
                    and x.is_floating_point() and x.dtype == w.dtype and (b is None or b.dtype == w.dtype)
                    and w.requires_grad and w.numel() * w.element_size() >= recompute.MIN_BYTES):
                self.calls += 1
                return LinearRules.apply(x, w, b)
        return func(*args, **kwargs)
