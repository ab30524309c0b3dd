"""ReLU that keeps a 1-byte mask for its backward instead of its output.

The stock ReLU keeps its float output for ``threshold_backward``; in an unrolled inner loop
(backpropagation through training) every step's graph holds it until the outer backward.
:class:`ReluMask` keeps ``x > 0`` as a bool tensor (a quarter of a float32 output); its
backward ``g * mask`` is itself differentiable (a double backward keeps the same
mask).  With :class:`~.pooling.MaxPool2dChannelsLast`, which no longer keeps its input, the
ReLU-then-pool activation of the reference ConvNet is no longer held by any step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._transforms import dual_level_active, functorch_active
from . import recompute
from .rules import RuleMode


class ReluMask(torch.autograd.Function):
    """``relu(x)``; gradient ``g * (x > 0)`` (as ``threshold_backward``: a NaN input passes the
    gradient)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out != 0)  # ~(x <= 0) in one pass: relu(NaN) is NaN, which != 0
        return out

    @staticmethod
    def backward(ctx, g):
        mask, = ctx.saved_tensors
        # the mask read as bytes: a float-by-uint8 product is ~3x faster on the CPU than by bool (and
        # ATen's where / masked_fill with a bool mask slower still); the same values
        mask = mask.view(torch.uint8)
        gx = g * mask
        recompute.register(gx, torch.mul, g, mask)
        return gx


class relu_rules(RuleMode):
    """Within this context ``F.relu`` / ``torch.relu`` (not in place) of a floating tensor that
    requires grad runs through :class:`ReluMask`; ``calls`` counts them."""

    FUNCS = (F.relu, torch.relu)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.relu or func is torch.relu) and torch.is_grad_enabled() and not functorch_active() \
                and not dual_level_active():
            x = args[0] if args else kwargs.get("input")
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad and not inplace:
                self.calls += 1
                return ReluMask.apply(x)
        return func(*args, **kwargs)
