"""2-D max pooling through the channels-last layout on the CPU.

ATen's CPU kernel of ``max_pool2d_with_indices`` for NCHW-contiguous inputs is
scalar; its channels-last kernel vectorises over channels.  On the reference
ConvNet's first layer (128x32x14x14, 3x3 stride 2) the NCHW call takes ~2.4 ms
and a round trip (copy to channels-last, pool, copy both outputs back) ~0.6 ms
on the 2-core CPU: the pooling was the largest op of a forward pass.  Values
and indices are the same (indices are flat ``h * W + w`` positions in either
layout, and both kernels scan a window in the same order), so are the
gradients: the backward is ATen's ``max_pool2d_with_indices_backward`` on the
NCHW tensors, itself differentiable (double backward).

Two entry points, used where the engine runs the student:

* :class:`pool_rules`, a ``TorchFunctionMode`` for eager autograd (the
  validation gradient and the double-backward operator);
* :func:`pool_channels_last`, a rewrite of ``make_fx`` graphs (the linearised
  forward-over-reverse trace).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import recompute
from .rules import RuleMode

_MAXPOOL = torch.ops.aten.max_pool2d_with_indices.default
_MIN_CHANNELS = 8  # the channels-last kernel vectorises over channels


def _worth_it(x) -> bool:
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and x.shape[1] >= _MIN_CHANNELS
            and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last))


def _pool_via_channels_last(x, kernel_size, stride, padding, dilation, ceil_mode):
    out, idx = _MAXPOOL(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding, dilation,
                        ceil_mode)
    return out.contiguous(), idx.contiguous()


class MaxPool2dChannelsLast(torch.autograd.Function):
    """``(out, indices)`` of ``max_pool2d_with_indices`` computed in channels-last, returned NCHW."""

    @staticmethod
    def forward(x, kernel_size, stride, padding, dilation, ceil_mode):
        return _pool_via_channels_last(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode = inputs
        _, idx = output
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        ctx.x_shape = x.shape  # the backward reads only the input's shape: x itself is not kept
        # in an unrolled loop, int32 positions in the input plane: half the bytes kept (ATen's
        # backward takes int64: the copy it is given is registered as recomputable)
        narrow = recompute.active() and x.shape[-2] * x.shape[-1] < 2**31
        ctx.save_for_backward(idx.to(torch.int32) if narrow else idx)

    @staticmethod
    def backward(ctx, gout, _gidx):
        if gout is None:
            return (None,) * 6
        idx, = ctx.saved_tensors
        conf = (ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation, ctx.ceil_mode)
        if idx.dtype != torch.int64:
            idx32, idx = idx, idx.long()
            recompute.register(idx, torch.Tensor.long, idx32)
        gx = _scatter_to_input(gout, idx, ctx.x_shape, conf)
        shape = ctx.x_shape
        recompute.register(gx, lambda gout, idx: _scatter_to_input(gout, idx, shape, conf), gout, idx)
        return gx, None, None, None, None, None


def _scatter_to_input(gout, idx, x_shape, conf):
    # ATen's backward scatters gout by the indices and reads only the sizes of its `self`: a
    # stride-0 stand-in, also in the graph a double backward keeps (no activation held for it)
    x = gout.new_zeros(()).expand(x_shape)
    return torch.ops.aten.max_pool2d_with_indices_backward(gout, x, *conf, idx)


def _pair(v, default=None):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    return [v, v] if isinstance(v, int) else [int(a) for a in v]


class pool_rules(RuleMode):
    """Within this context ``F.max_pool2d`` on an NCHW-contiguous CPU float tensor with at
    least 8 channels runs through :class:`MaxPool2dChannelsLast`; ``calls`` counts them."""

    FUNCS = (F.max_pool2d, F._max_pool2d, F.max_pool2d_with_indices)  # the first: what _max_pool2d hands on
    _NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUNCS:
            a = dict(zip(self._NAMES, args))
            a.update(kwargs)
            x = a["input"]
            if _worth_it(x):
                k = _pair(a["kernel_size"])
                s = _pair(a.get("stride"), k)
                self.calls += 1
                out, idx = MaxPool2dChannelsLast.apply(x, k, s, _pair(a.get("padding", 0)),
                                                       _pair(a.get("dilation", 1)), bool(a.get("ceil_mode", False)))
                return (out, idx) if a.get("return_indices", False) else out
        return func(*args, **kwargs)


def pool_channels_last(gm: fx.GraphModule) -> int:
    """Rewrite each ``max_pool2d_with_indices`` of a traced graph whose input is an
    NCHW-contiguous CPU float tensor with >= 8 channels into the channels-last round trip;
    returns how many were rewritten."""
    from .linearize import recompiled  # linearize imports this module

    graph = gm.graph
    changed = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not _MAXPOOL or n.kwargs:
            continue
        x = n.args[0]
        if not isinstance(x, fx.Node) or not _worth_it(x.meta.get("val")):
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in n.users):
            continue
        with graph.inserting_before(n):
            xc = graph.call_function(torch.ops.aten.clone.default, (x,), {"memory_format": torch.channels_last})
            pooled = graph.call_function(_MAXPOOL, (xc, *n.args[1:]))
        for u in list(n.users):
            with graph.inserting_after(u):
                part = graph.call_function(operator.getitem, (pooled, u.args[1]))
            with graph.inserting_after(part):
                back = graph.call_function(torch.ops.aten.clone.default, (part,),
                                           {"memory_format": torch.contiguous_format})
            back.meta.update(u.meta)
            part.meta.update(u.meta)
            u.replace_all_uses_with(back)
            graph.erase_node(u)
        graph.erase_node(n)
        changed += 1
    return recompiled(gm, changed)
