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
linearised product from ~1.7x to ~1x a training step and the linearised
primal pass from ~2.3x to ~1.1x (BENCHMARKS.md).

:func:`batch_norm_reverse_rules` (below) serves reverse-over-reverse instead, the inner steps of
backpropagation through training: ATen's forward and backward kernels, and a double backward
by the reverse rule in one C++ kernel (``ops/channel.py`` ``batch_norm_reverse``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._transforms import dual_level_active, functorch_active
from ..ops.channel import batch_norm_reverse, channel_combine, channel_sums
from ..reference import channel as _reference_channel
from .rules import RuleMode


def _normalise(x: torch.Tensor, weight, bias, eps: float):
    """``(y, x̂, rstd)``: ATen's fused batch norm (biased batch variance, two passes) and
    ``x̂ = (x - mean) * rstd`` in one more pass."""
    y, mean, rstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)  # float32 statistics for half inputs
    xhat = channel_combine([x], rstd.unsqueeze(0), -mean * rstd)
    return y, xhat, rstd


def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


# A Function may keep only its inputs and outputs for its rules, so that a trace computes each
# value once: BatchNormTrain returns x̂ and rstd as extra, non-differentiable outputs, and the
# backward's rule reuses the backward's own outputs (the sums gweight and gbias).


class BatchNormTrain(torch.autograd.Function):
    """``(y, x̂, rstd)``, ``y = weight * x̂ + bias`` with batch statistics; forward-mode rule above."""

    @staticmethod
    def forward(x, weight, bias, eps):
        return _normalise(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        _, xhat, rstd = output
        ctx.mark_non_differentiable(xhat, rstd)
        ctx.set_materialize_grads(False)  # no activation-sized zeros for the unused x̂ gradient
        ctx.save_for_backward(x, weight, xhat, rstd)
        ctx.save_for_forward(weight, xhat, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy, _gxhat, _grstd):
        x, weight, xhat, rstd = ctx.saved_tensors
        if gy is None:
            return None, None, None, None
        gx, gw, gb = BatchNormTrainBackward.apply(gy, x, weight, xhat, rstd)
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        weight, xhat, rstd = ctx.saved_tensors
        m = xhat.numel() // xhat.shape[1]
        scale = weight * rstd
        dx = _zeros_if_none(dx, xhat)
        sums = channel_sums([dx, dx], [None, xhat]) / m  # a = mean(dx), b = mean(dx xhat)
        a, b = sums[0], sums[1]
        coef = torch.stack([scale, _zeros_if_none(dweight, weight) - scale * b])
        dy = channel_combine([dx, xhat], coef, _zeros_if_none(dbias, weight) - scale * a)
        return dy, None, None


class BatchNormTrainBackward(torch.autograd.Function):
    """``(gx, gweight, gbias)`` of :class:`BatchNormTrain` from ``(gy, x, weight, x̂, rstd)``
    (``x`` for its tangent and its gradient; ``x̂`` and ``rstd`` are not differentiated: the
    rules account for them).  Forward-mode rule above; the reverse-mode rule (a double
    backward through these functions, e.g. reverse-over-reverse inside :func:`batch_norm_rules`)
    in :meth:`backward`.  Backpropagation through training uses :class:`BatchNormTrainRunning`
    instead, which keeps ATen's forward and backward kernels and only shares the reverse rule."""

    @staticmethod
    def forward(gy, x, weight, xhat, rstd):
        m = x.numel() // x.shape[1]
        sums = channel_sums([gy, gy], [None, xhat])
        gb, gw = sums[0], sums[1]
        wr = weight * rstd
        return channel_combine([gy, xhat], torch.stack([wr, -wr * gw / m]), -wr * gb / m), gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, weight, xhat, rstd = inputs
        _, gw, gb = output
        ctx.save_for_forward(gy, weight, xhat, rstd, gw, gb)
        ctx.save_for_backward(gy, weight, xhat, rstd, gw, gb)

    @staticmethod
    @once_differentiable
    def backward(ctx, u, ugw, ugb):
        gy, weight, xhat, rstd, gw, gb = ctx.saved_tensors
        ggy, gx_in, gw_in = _reference_channel.batch_norm_reverse_rule(
            u, ugw, ugb, gy, weight, xhat, rstd, gw, gb, ctx.needs_input_grad[:3], channel_sums, channel_combine)
        return ggy, gx_in, gw_in, None, None

    @staticmethod
    def jvp(ctx, dgy, dx, dweight, _dxhat, _drstd):
        # d(gx) = k1 dgy + k2 dx + k3 xhat + k4 gy + k5 per channel (the rule in the module
        # docstring with xhat-dot = rstd (dx - a - b xhat) expanded): one pass for the sums,
        # one for the combination
        gy, weight, xhat, rstd, gw, gb = ctx.saved_tensors
        m = xhat.numel() // xhat.shape[1]
        dgy = _zeros_if_none(dgy, gy)
        dx = _zeros_if_none(dx, xhat)
        s = channel_sums([dx, dx, dgy, dgy, gy], [None, xhat, None, xhat, dx])
        a, b = s[0] / m, s[1] / m
        dgb = s[2]
        dgw = s[3] + rstd * (s[4] - a * gb - b * gw)  # sum(dgy xhat) + sum(gy xhat-dot)
        wr = weight * rstd
        dscale = _zeros_if_none(dweight, weight) * rstd - wr * rstd * b  # d(weight * rstd)
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


class batch_norm_rules(RuleMode):
    """Within this context ``F.batch_norm(x, None, None, w, b, training=True)`` runs
    through :class:`BatchNormTrain` (affine or not, any ``[N, C, ...]`` input);
    ``calls`` counts them."""

    FUNCS = (F.batch_norm,)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _batch_norm_args(args, kwargs)
            x = a["input"]
            # mixed dtypes (half activations, float32 affine parameters under autocast): the stock op
            same_dtype = all(t is None or t.dtype == x.dtype for t in (a["weight"], a["bias"]))
            if a["training"] and a["running_mean"] is None and a["running_var"] is None and x.dim() >= 2 \
                    and x.numel() > x.shape[1] and same_dtype:
                c = x.shape[1]
                w = a["weight"] if a["weight"] is not None else x.new_ones(c)
                b = a["bias"] if a["bias"] is not None else x.new_zeros(c)
                self.calls += 1
                return BatchNormTrain.apply(x, w, b, float(a["eps"]))[0]
        return func(*args, **kwargs)


# ----------------------------------------------------------------- reverse-over-reverse (BPTT)
#
# Backpropagation through training differentiates each inner step's backward once more, in
# reverse mode.  The stock double backward of ``native_batch_norm_backward`` is some forty
# elementwise operations over the activation; on the reference ConvNet it was a quarter of a
# BPTT outer step.  Here the forward and the backward keep ATen's fused kernels and what the
# stock nodes keep (x, weight, the batch statistics; gy), and only the double backward is the
# reverse rule (formulas in reference/channel.py), on the CPU one C++ kernel of two passes:
# per-channel sums, then both activation-sized gradients (ops/channel.py batch_norm_reverse).


def _differentiable_rule(u, ugw, ugb, gy, x, weight, eps, needs):
    """The reverse rule (``reference/channel.py``) from differentiable operations, with ``x̂``,
    ``rstd``, ``gw`` and ``gb`` recomputed as functions of ``x`` and ``gy``: a double backward
    that can itself be differentiated (a third derivative)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    rstd = (x.var(dims, unbiased=False) + eps).rsqrt()
    xhat = (x - x.mean(dims, keepdim=True)) * rstd.view(shape)
    gb, gw = gy.sum(dims), (gy * xhat).sum(dims)
    return _reference_channel.batch_norm_reverse_rule(u, ugw, ugb, gy, weight, xhat, rstd, gw, gb, needs,
                                                      _reference_channel.channel_sums,
                                                      _reference_channel.channel_combine)


class BatchNormGrad(torch.autograd.Function):
    """``(gx, gweight, gbias)`` of batch normalisation with batch statistics (ATen's
    ``native_batch_norm_backward``), from ``(gy, x, weight, mean, rstd)``; its backward is
    ``ops.channel.batch_norm_reverse`` (``mean`` and ``rstd`` are functions of ``x`` that the
    rule accounts for; they are not differentiated)."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, rstd, eps):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(gy, x, weight, None, None, mean, rstd, True, eps,
                                                                [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, rstd, gw, gb)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u, ugw, ugb):
        gy, x, weight, mean, rstd, gw, gb = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: a rule that can be differentiated again
            out = _differentiable_rule(u, ugw, ugb, gy, x, weight, ctx.eps, needs)
        else:
            out = batch_norm_reverse(u, gy, x, mean, rstd, weight, gw, gb, ugw, ugb, needs)
        return out[0], out[1], out[2], None, None, None


class BatchNormTrainRunning(torch.autograd.Function):
    """``F.batch_norm`` in training mode, running statistics (if any) updated in place as ATen
    does; the backward is :class:`BatchNormGrad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, rstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = BatchNormGrad.apply(gy, x, weight, mean, rstd, ctx.eps)
        return gx, gw, gb, None, None, None, None


class batch_norm_reverse_rules(RuleMode):
    """Within this context ``F.batch_norm`` in training mode of an affine BatchNorm on 2- to
    5-D float32/float64 CPU tensors, with grad enabled, runs through
    :class:`BatchNormTrainRunning` (running statistics or not); outside ``torch.func``
    transforms and forward-mode AD (no ``jvp`` rule).  ``calls`` counts them."""

    FUNCS = (F.batch_norm,)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and torch.is_grad_enabled() and not functorch_active() and not dual_level_active():
            a = _batch_norm_args(args, kwargs)
            x, w, b = a["input"], a["weight"], a["bias"]
            if (a["training"] and a["momentum"] is not None and isinstance(x, torch.Tensor)
                    and isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
                    and 2 <= x.dim() <= 5 and x.numel() > x.shape[1]
                    and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                    and w.dtype == x.dtype and b.dtype == x.dtype and w.shape == b.shape == (x.shape[1],)):
                self.calls += 1
                return BatchNormTrainRunning.apply(x, w, b, a["running_mean"], a["running_var"],
                                                   float(a["momentum"]), float(a["eps"]))
        return func(*args, **kwargs)
