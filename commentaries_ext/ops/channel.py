"""Per-channel sums and combinations of ``[N, C, *]`` tensors, one pass each: the
passes of BatchNorm's forward-mode rules (``engine/batchnorm.py``).

Public functions
----------------
``channel_sums(a, b)``            ``out[k, c] = sum_{n, *} a_k * b_k`` (``b_k`` None: ``sum a_k``), ``[K, C]``
``channel_combine(xs, coef, bias)`` ``out = sum_k coef[k, c] * xs_k + bias[c]``, ``xs_0``'s shape
``batch_norm_reverse(u, gy, x, mean, rstd, weight, gw, gb, ugw, ugb, needs)``
                                  the double backward of BatchNorm with batch statistics: the
                                  gradients w.r.t. ``(gy, x, weight)`` of ``<u, gx> + <ugw, gw> +
                                  <ugb, gb>``, ``(gx, gw, gb)`` its backward at ``(gy, x, weight)``
                                  (``mean``, ``rstd``: the batch statistics of ``x``); two passes

Kernel ops (backends ``reference`` and ``cpp``; on the GPU the reference runs)
------------------------------------------------------------------------------
Validated input: 1 to 8 contiguous tensors of one shape ``[N, C, *]``, one dtype
(float32/float64; bfloat16/float16 on the GPU) and device; ``coef`` ``[K, C]`` and
``bias`` ``[C]`` contiguous, same dtype and device; ``batch_norm_reverse``: ``u``, ``gy``,
``x`` such tensors, the other seven ``[C]``, ``needs`` three bools; an output not asked for
is an empty ``[0]`` (its reference, ``reference/channel.py``, holds the formulas).  Sums
accumulate in float64 on the CPU (per-row vector sums in the data dtype).  Not
differentiable.

The public functions call the selected backend's kernel directly (no device-
independent ``torch.library`` op in between): they run inside ``make_fx`` traces
of forward-mode rules, where the C++ kernel op (with its fake registration) is
what the graph should call, without a Python dispatch layer per product.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _compiled, backend
from ..reference import channel as _reference  # noqa: F401  (registers the reference backend)

KERNEL_OPS = ("channel_sums", "channel_combine", "batch_norm_reverse")
_compiled.register_kernel_ops(KERNEL_OPS)
MAX_TERMS = 8


def _fake_sums(a, b):
    return a[0].new_empty((len(a), a[0].shape[1]))


def _fake_combine(xs, coef, bias):
    return torch.empty_like(xs[0], memory_format=torch.contiguous_format)


if _compiled.loaded():
    if _compiled._has_op("cpp_channel_sums"):
        torch.library.register_fake("commentaries_ext::cpp_channel_sums")(_fake_sums)
    if _compiled._has_op("cpp_channel_combine"):
        torch.library.register_fake("commentaries_ext::cpp_channel_combine")(_fake_combine)
    if _compiled._has_op("cpp_batch_norm_reverse"):
        @torch.library.register_fake("commentaries_ext::cpp_batch_norm_reverse")
        def _fake_batch_norm_reverse(u, gy, x, mean, rstd, weight, gw, gb, ugw, ugb, needs):
            return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) if n else x.new_empty(0)
                         for n in needs[:2]) + (mean.new_empty(mean.shape) if needs[2] else x.new_empty(0),)


def _check(fn: str, xs: Sequence, what: str) -> list[Tensor]:
    if not isinstance(xs, (list, tuple)) or not xs or len(xs) > MAX_TERMS:
        raise ValueError(f"{fn}: {what} must be a list of 1 to {MAX_TERMS} tensors")
    x0 = xs[0]
    if not isinstance(x0, Tensor) or x0.dim() < 2:
        raise ValueError(f"{fn}: {what}[0] must be an [N, C, *] tensor")
    allowed = (torch.float32, torch.float64) if x0.device.type == "cpu" else \
        (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if x0.dtype not in allowed:
        raise TypeError(f"{fn}: {what}[0] has dtype {x0.dtype}; expected one of {allowed}")
    out = []
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {what}[{i}] must be a Tensor, got {type(x).__name__}")
        if x.shape != x0.shape:
            raise ValueError(f"{fn}: {what}[{i}] has shape {tuple(x.shape)} but {what}[0] has {tuple(x0.shape)}")
        if x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"{fn}: {what}[{i}] is {x.dtype} on {x.device} but {what}[0] is {x0.dtype} on {x0.device}")
        out.append(x.contiguous())
    return out


def _check_small(fn: str, name: str, t: Tensor, shape: tuple, like: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{fn}: {name} is {t.dtype} on {t.device} but the inputs are {like.dtype} on {like.device}")
    return t.contiguous()


def channel_sums(a: Sequence[Tensor], b: Sequence[Optional[Tensor]] | None = None) -> Tensor:
    """``[K, C]``: per channel, the sum over every other dimension of ``a_k * b_k`` (or ``a_k``)."""
    a = _check("channel_sums", a, "a")
    if b is None:
        b = [None] * len(a)
    if len(b) != len(a):
        raise ValueError(f"channel_sums: b has {len(b)} entries but a has {len(a)}")
    bb: list[Optional[Tensor]] = []
    for i, t in enumerate(b):
        if t is not None:
            if not isinstance(t, Tensor):
                raise TypeError(f"channel_sums: b[{i}] must be a Tensor or None, got {type(t).__name__}")
            if t.shape != a[0].shape or t.dtype != a[0].dtype or t.device != a[0].device:
                raise ValueError(f"channel_sums: b[{i}] is {tuple(t.shape)} {t.dtype} on {t.device} but a[0] is "
                                 f"{tuple(a[0].shape)} {a[0].dtype} on {a[0].device}")
            t = t.contiguous()
        bb.append(t)
    return backend.helper_kernel("channel_sums", a[0].device)(a, bb)


def channel_combine(xs: Sequence[Tensor], coef: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``sum_k coef[k, c] * xs_k + bias[c]`` (contiguous, ``xs[0]``'s shape)."""
    xs = _check("channel_combine", xs, "xs")
    coef = _check_small("channel_combine", "coef", coef, (len(xs), xs[0].shape[1]), xs[0])
    if bias is not None:
        bias = _check_small("channel_combine", "bias", bias, (xs[0].shape[1],), xs[0])
    return backend.helper_kernel("channel_combine", xs[0].device)(xs, coef, bias)


def batch_norm_reverse(u: Tensor, gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, gw: Tensor,
                       gb: Tensor, ugw: Optional[Tensor] = None, ugb: Optional[Tensor] = None,
                       needs: Sequence[bool] = (True, True, True)) -> tuple:
    """``(d/dgy, d/dx, d/dweight)`` of ``<u, gx> + <ugw, gw> + <ugb, gb>`` where ``(gx, gw, gb)``
    is batch normalisation's backward at ``(gy, x, weight)`` with batch statistics ``mean``,
    ``rstd``; None where ``needs`` is False (``u``/``ugw``/``ugb`` None: zero).  Inputs of other
    layouts (channels-last) are copied to contiguous ones, and the results are contiguous."""
    if u is None:
        u = torch.zeros_like(gy)
    u, gy, x = _check("batch_norm_reverse", [u, gy, x], "(u, gy, x)")
    c = x.shape[1]
    small = [mean, rstd, weight, gw, gb, torch.zeros_like(gw) if ugw is None else ugw,
             torch.zeros_like(gb) if ugb is None else ugb]
    small = [_check_small("batch_norm_reverse", n, t, (c,), x)
             for n, t in zip(("mean", "rstd", "weight", "gw", "gb", "ugw", "ugb"), small)]
    needs = [bool(v) for v in needs]
    if len(needs) != 3:
        raise ValueError("batch_norm_reverse: needs must have 3 entries")
    out = backend.helper_kernel("batch_norm_reverse", x.device)(u, gy, x, *small, needs)
    return tuple(o if n else None for o, n in zip(out, needs))
