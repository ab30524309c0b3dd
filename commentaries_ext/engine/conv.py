"""2-D convolution input gradients by ``matmul`` + ``col2im`` on the CPU, where that is
measured faster than oneDNN, also inside graphs that are differentiated twice.

oneDNN's input gradient is slow for some shapes on the CPU: the reference ConvNet's first
layer (one input channel, 5x5, stride 2) at batch 32 takes ~0.85 ms for
``convolution_backward``'s input gradient where ``col2im(W^T gy)`` takes ~0.12 ms (the matmul
and the C++ col2im of ``ops/fold.py``; ATen's col2im alone takes ~0.3 ms), and the
double backward of a convolution's weight gradient computes the same kind of product through
ATen's generic transposed convolution (~1.1 ms).  The choice is made per shape, timed once
(:func:`fold_is_faster`).  Two entry points:

* :func:`input_grad_by_fold`, the lowering the linearised trace uses (``linearize.py``);
* :class:`conv_rules`, a ``TorchFunctionMode`` for eager autograd with ``create_graph``
  (the inner steps of backpropagation through training, the IFT engine's double-backward
  graphs): ``F.conv2d`` of such a layer runs oneDNN's forward
  with a backward of two nodes, :class:`ConvWeightGrad` (oneDNN's weight gradient) and
  :class:`ConvInputGrad` (the fold), each with a reverse rule made of the same three
  kinds of op (a convolution forward, one of the two nodes), so that every input gradient
  of the double backward takes the fast path too.  They keep what oneDNN's backward keeps
  (``gy``, ``x``, ``W``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._transforms import dual_level_active as _dual_level_active
from .._transforms import functorch_active as _functorch_active
from ..ops.fold import col2im
from . import recompute
from .rules import RuleMode

CONV_BWD = torch.ops.aten.convolution_backward.default
_FOLD_FASTER: dict = {}  # convolution shapes -> whether matmul + col2im beat convolution_backward


def input_grad_by_fold(go, weight, in_hw, kernel, stride, padding, dilation):
    """The input gradient of a 2-D convolution as ``col2im(W^T @ grad_out)``."""
    n, cout = go.shape[0], go.shape[1]
    cols = torch.matmul(weight.reshape(cout, -1).t(), go.reshape(n, cout, -1))
    return col2im(cols, tuple(in_hw), tuple(kernel), tuple(dilation), tuple(padding), tuple(stride))


def fold_is_faster(key) -> bool:
    """``key = (grad_out shape, input shape, weight shape, dtype, stride, padding, dilation)``;
    timed once per key: the fold against ``convolution_backward``'s input gradient. Under
    ``torch.use_deterministic_algorithms(True)`` or torch.distributed nothing is timed and
    ``convolution_backward`` is used (a timed choice changes the rounding from run to run, and
    could differ between ranks); the choices made are saved with a checkpoint."""
    if key not in _FOLD_FASTER:
        from .vector import best_seconds, timing_allowed

        if not timing_allowed():
            return False

        go_shape, in_shape, w_shape, dtype, stride, padding, dilation = key
        g = torch.Generator().manual_seed(0)
        go, x, w = (torch.randn(sh, generator=g, dtype=dtype) for sh in (go_shape, in_shape, w_shape))
        native = best_seconds(lambda: CONV_BWD(go, x, w, None, list(stride), list(padding), list(dilation), False,
                                               [0, 0], 1, [True, False, False]))
        fold = best_seconds(lambda: input_grad_by_fold(go, w, in_shape[2:], w_shape[2:], stride, padding, dilation))
        _FOLD_FASTER[key] = fold < 0.8 * native
    return _FOLD_FASTER[key]


def _input_grad(gy, w, in_shape, conf):
    stride, padding, dilation = conf
    key = (tuple(gy.shape), tuple(in_shape), tuple(w.shape), gy.dtype, stride, padding, dilation)
    if fold_is_faster(key):
        return input_grad_by_fold(gy, w, in_shape[2:], w.shape[2:], stride, padding, dilation)
    x = gy.new_empty(in_shape)  # only its shape is read (not an expanded tensor: oneDNN's slow path)
    return CONV_BWD(gy, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                    [True, False, False])[0]


def _weight_grad(gy, x, w_shape, conf):
    stride, padding, dilation = conf
    w = x.new_empty(w_shape)  # only its shape is read (not an expanded tensor: oneDNN's slow path)
    return CONV_BWD(gy, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                    [False, True, False])[1]


def _wanted(ctx, i: int) -> bool:
    """Whether the running backward pass uses the gradient of input ``i``: ``needs_input_grad``
    only says that the input requires grad (e.g. a blended input, which depends on the
    commentary, in a backward that asks for the parameters' gradients only)."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None or type(node).__name__ == "AccumulateGrad":  # a leaf: may be an input of autograd.grad
        return True
    return torch._C._will_engine_execute_node(node)


class ConvWeightGrad(torch.autograd.Function):
    """The weight gradient ``dW(gy, x)`` of a convolution (oneDNN), with its reverse rule for
    an incoming ``G``: ``d gy = conv2d(x, G)``, ``d x = dx(gy, G)`` (:class:`ConvInputGrad`)."""

    @staticmethod
    def forward(ctx, gy, x, w_shape, conf):
        ctx.conf = conf
        ctx.save_for_backward(gy, x)
        return _weight_grad(gy, x, w_shape, conf)

    @staticmethod
    def backward(ctx, g):
        gy, x = ctx.saved_tensors
        d_gy = F.conv2d(x, g, None, *ctx.conf) if _wanted(ctx, 0) else None
        d_x = ConvInputGrad.apply(gy, g, x.shape, ctx.conf) if _wanted(ctx, 1) else None
        return d_gy, d_x, None, None


class ConvInputGrad(torch.autograd.Function):
    """The input gradient ``dx(gy, W)`` of a convolution (the fold or oneDNN, whichever was
    measured faster for the shape), with its reverse rule for an incoming ``G``:
    ``d gy = conv2d(G, W)``, ``d W = dW(gy, G)`` (:class:`ConvWeightGrad`)."""

    @staticmethod
    def forward(ctx, gy, w, in_shape, conf):
        ctx.conf = conf
        ctx.save_for_backward(gy, w)
        return _input_grad(gy, w, in_shape, conf)

    @staticmethod
    def backward(ctx, g):
        gy, w = ctx.saved_tensors
        d_gy = F.conv2d(g, w, None, *ctx.conf) if _wanted(ctx, 0) else None
        d_w = ConvWeightGrad.apply(gy, g, w.shape, ctx.conf) if _wanted(ctx, 1) else None
        return d_gy, d_w, None, None


def _cheap_to_recompute(x, w, y) -> bool:
    # a first layer: a few multiply-adds per output element, an output much larger than the
    # input (which the graph keeps anyway)
    return w.shape[1] * w.shape[2] * w.shape[3] <= 64 and y.numel() >= 2 * x.numel()


class Conv2dRules(torch.autograd.Function):
    """``F.conv2d`` (oneDNN's forward) whose backward is :class:`ConvInputGrad` and
    :class:`ConvWeightGrad`, so that a graph built with ``create_graph=True`` holds them."""

    @staticmethod
    def forward(ctx, x, w, b, conf):
        ctx.conf = conf
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w)
        y = F.conv2d(x, w, b, *conf)
        if recompute.active() and _cheap_to_recompute(x, w, y):
            recompute.register(y, lambda x, w, b: F.conv2d(x, w, b, *conf), x, w, b)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = (_wanted(ctx, i) for i in range(3))
        dx = ConvInputGrad.apply(gy, w, x.shape, ctx.conf) if need_x else None
        dw = ConvWeightGrad.apply(gy, x, w.shape, ctx.conf) if need_w else None
        db = gy.sum((0, 2, 3)) if (need_b and ctx.has_bias) else None
        return dx, dw, db, None


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return v * 2 if len(v) == 1 else v  # F.conv2d takes a 1-element sequence for both dimensions


class conv_rules(RuleMode):
    """Within this context ``F.conv2d`` with grad enabled on 4-D CPU float tensors (groups 1,
    numeric padding) whose input requires grad and whose input gradient measured faster by
    the fold runs through :class:`Conv2dRules`; ``calls`` counts them.  (Without an input
    gradient, first or second order, there is nothing to gain.)"""

    FUNCS = (F.conv2d,)
    _NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # classic autograd.Functions without jvp / vmap rules: not under torch.func or forward AD
        if func is F.conv2d and torch.is_grad_enabled() and not _functorch_active() and not _dual_level_active():
            a = dict(zip(self._NAMES, args))
            a.update(kwargs)
            x, w, padding = a["input"], a["weight"], a.get("padding", 0)
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 4 and w.dim() == 4
                    and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and w.dtype == x.dtype
                    and a.get("groups", 1) == 1 and not isinstance(padding, str) and x.requires_grad):
                conf = (_pair(a.get("stride", 1)), _pair(padding), _pair(a.get("dilation", 1)))
                out_hw = [(x.shape[2 + i] + 2 * conf[1][i] - conf[2][i] * (w.shape[2 + i] - 1) - 1) // conf[0][i] + 1
                          for i in range(2)]
                key = ((x.shape[0], w.shape[0], *out_hw), tuple(x.shape), tuple(w.shape), x.dtype, *conf)
                if min(out_hw) > 0 and x.shape[1] == w.shape[1] and fold_is_faster(key):  # else conv2d's own error
                    self.calls += 1
                    return Conv2dRules.apply(x, w, a.get("bias"), conf)
        return func(*args, **kwargs)
