"""Batch normalisation in training mode with hand-derived forward-mode rules.

A forward-over-reverse Hessian-vector product differentiates BatchNorm's
backward in forward mode.  Through the stock operators that is the forward-AD
formula of ``native_batch_norm_backward`` decomposed into some twenty
elementwise passes over the activation; on the reference ConvNet it was most
of the time of each product.  Here the forward and the backward of batch
normalisation with batch statistics are two ``autograd.Function``s whose
``jvp`` rules are written out per channel (``x̂ = (x - mean) * rstd``, ``M``
elements per channel, ``a = mean(ẋ)``, ``b = mean(ẋ x̂)``):

    forward:   y  = w x̂ + bias
               ẏ  = w rstd ẋ + (ẇ - w rstd b) x̂ + (ḃias - w rstd a)
    backward:  gx = w rstd (gy - Σgy/M - x̂ Σ(gy x̂)/M),  gw = Σ gy x̂,  gbias = Σ gy
               ẋ̂ = rstd (ẋ - a - b x̂),  ṙstd = -rstd² b
               d(gx) = (ẇ rstd + w ṙstd) (gy - Σgy/M - x̂ Σ(gy x̂)/M)
                       + w rstd (ġy - Σġy/M - ẋ̂ Σ(gy x̂)/M - x̂ Σ(ġy x̂ + gy ẋ̂)/M)

:func:`batch_norm_rules` is a ``TorchFunctionMode`` that routes
``F.batch_norm`` calls in training mode without running statistics (what
:class:`~commentaries_ext.engine.FunctionalModule` makes of a BatchNorm layer
in training mode) through these functions; everything else is left alone.
Values and first derivatives equal the stock operator's; the engine uses it
where it takes forward-over-reverse products.  Each rule is one pass of
per-channel sums and one pass of per-channel combination
(``ops/channel.py``, C++ on the CPU).  On the reference ConvNet this took a
linearised product from 1.65x to about 1.1x a training step (BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.channel import channel_combine, channel_sums


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _normalised(x: torch.Tensor, eps: float):
    """``(x̂, rstd)`` with the biased batch variance (two passes, as ATen)."""
    dims = _reduce_dims(x)
    centred = x - _per_channel(x.mean(dims), x)
    rstd = (centred.square().mean(dims) + eps).rsqrt()
    return centred * _per_channel(rstd, x), rstd


def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class BatchNormTrain(torch.autograd.Function):
    """``y = weight * x̂ + bias`` with batch statistics; forward-mode rule above."""

    @staticmethod
    def forward(x, weight, bias, eps):
        xhat, _ = _normalised(x, eps)
        return xhat * _per_channel(weight, x) + _per_channel(bias, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx, gw, gb = BatchNormTrainBackward.apply(gy, x, weight, ctx.eps)
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x, weight = ctx.saved_tensors
        m = x.numel() // x.shape[1]
        xhat, rstd = _normalised(x, ctx.eps)
        scale = weight * rstd
        dx = _zeros_if_none(dx, x)
        sums = channel_sums([dx, dx], [None, xhat]) / m  # a = mean(dx), b = mean(dx xhat)
        a, b = sums[0], sums[1]
        coef = torch.stack([scale, _zeros_if_none(dweight, weight) - scale * b])
        return channel_combine([dx, xhat], coef, _zeros_if_none(dbias, weight) - scale * a)


class BatchNormTrainBackward(torch.autograd.Function):
    """``(gx, gweight, gbias)`` of :class:`BatchNormTrain`; forward-mode rule above.
    Its own backward is not defined: the engine never differentiates it twice
    in reverse mode (double backward uses the stock operator)."""

    @staticmethod
    def forward(gy, x, weight, eps):
        dims = _reduce_dims(x)
        m = x.numel() // x.shape[1]
        xhat, rstd = _normalised(x, eps)
        gb, gw = gy.sum(dims), (gy * xhat).sum(dims)
        inner = gy - _per_channel(gb / m, x) - xhat * _per_channel(gw / m, x)
        return inner * _per_channel(weight * rstd, x), gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, weight, eps = inputs
        ctx.save_for_forward(gy, x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("BatchNormTrainBackward is differentiated in forward mode only")

    @staticmethod
    def jvp(ctx, dgy, dx, dweight, _):
        # d(gx) = k1 dgy + k2 dx + k3 xhat + k4 gy + k5 per channel (the rule in the module
        # docstring with xhat-dot = rstd (dx - a - b xhat) expanded): one pass for the five
        # sums, one for the combination
        gy, x, weight = ctx.saved_tensors
        m = x.numel() // x.shape[1]
        xhat, rstd = _normalised(x, ctx.eps)
        dgy = _zeros_if_none(dgy, gy)
        dx = _zeros_if_none(dx, x)
        gsum = channel_sums([gy, gy], [None, xhat])
        gb, gw = gsum[0], gsum[1]
        s = channel_sums([dx, dx, dgy, dgy, gy], [None, xhat, None, xhat, dx])
        a, b = s[0] / m, s[1] / m
        dgb = s[2]
        dgw = s[3] + rstd * (s[4] - a * gb - b * gw)  # sum(dgy xhat) + sum(gy xhat-dot)
        wr = weight * rstd
        dscale = _zeros_if_none(dweight, weight) * rstd - wr * rstd * b
        k2 = -wr * rstd * gw / m
        k3 = -k2 * b - wr * dgw / m - dscale * gw / m
        k5 = -k2 * a - wr * dgb / m - dscale * gb / m
        dgx = channel_combine([dgy, dx, xhat, gy], torch.stack([wr, k2, k3, dscale]), k5)
        return dgx, dgw, dgb


def _batch_norm_args(args, kwargs):
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


class batch_norm_rules(torch.overrides.TorchFunctionMode):
    """Within this context ``F.batch_norm(x, None, None, w, b, training=True)`` runs
    through :class:`BatchNormTrain` (affine or not, any ``[N, C, ...]`` input);
    ``calls`` counts them."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _batch_norm_args(args, kwargs)
            x = a["input"]
            if a["training"] and a["running_mean"] is None and a["running_var"] is None and x.dim() >= 2 and x.numel() > x.shape[1]:
                c = x.shape[1]
                w = a["weight"] if a["weight"] is not None else x.new_ones(c)
                b = a["bias"] if a["bias"] is not None else x.new_zeros(c)
                self.calls += 1
                return BatchNormTrain.apply(x, w, b, float(a["eps"]))
        return func(*args, **kwargs)
