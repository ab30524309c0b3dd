"""``col2im``: columns ``[N, C*KH*KW, OH*OW]`` summed back into images ``[N, C, H, W]``
(``torch.nn.functional.fold``), the scatter half of a 2-D convolution's input gradient by
matmul + col2im (``engine/conv.py``).

Public function
---------------
``col2im(cols, output_size, kernel_size, dilation, padding, stride)`` -- ``aten::col2im``'s
signature and values (each argument a pair of ints; ``cols`` 3-D); differentiable in
``cols`` (its adjoint is ``im2col``, ``F.unfold``).

Kernel op (backends ``reference``, ATen's col2im, and ``cpp``; on the GPU the reference runs)
---------------------------------------------------------------------------------------------
``col2im(Tensor cols, int[2] output_size, int[2] kernel_size, int[2] dilation, int[2] padding, int[2] stride) -> Tensor``:
validated input: ``cols`` contiguous float32/float64 ``[N, C*KH*KW, OH*OW]`` with ``OH``,
``OW`` the convolution's output sizes for ``output_size``; a new contiguous ``[N, C, H, W]``.

Like the channel family, the public function calls the selected backend's kernel directly
(no device-independent ``torch.library`` op in between): it runs inside the engine's
rewritten graphs, once per product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _compiled, backend
from .._transforms import dual_level_active, functorch_active
from ..reference import fold as _reference

KERNEL_OPS = ("col2im",)
_compiled.register_kernel_ops(KERNEL_OPS)


def _fake_col2im(cols, output_size, kernel_size, dilation, padding, stride):
    c = cols.shape[1] // (kernel_size[0] * kernel_size[1])
    return cols.new_empty((cols.shape[0], c, *output_size))


if _compiled.loaded() and _compiled._has_op("cpp_col2im"):
    torch.library.register_fake("commentaries_ext::cpp_col2im")(_fake_col2im)


def _pair(name: str, v) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int) for a in t):
        raise ValueError(f"col2im: {name} must be an int or a pair of ints, got {v!r}")
    return t


class _Col2Im(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cols, args):
        ctx.args = args
        return backend.helper_kernel("col2im", cols.device)(cols, *args)

    @staticmethod
    def backward(ctx, g):
        output_size, kernel_size, dilation, padding, stride = ctx.args
        return F.unfold(g, kernel_size, dilation, padding, stride), None


def col2im(cols: Tensor, output_size, kernel_size, dilation=1, padding=0, stride=1) -> Tensor:
    """``aten::col2im(cols, ...)`` for a 3-D ``cols`` ``[N, C*KH*KW, OH*OW]`` (see the module
    docstring); the C++ kernel on the CPU."""
    if not isinstance(cols, Tensor) or cols.dim() != 3:
        raise ValueError("col2im: cols must be a 3-D tensor [N, C*KH*KW, OH*OW], got "
                         f"{tuple(cols.shape) if isinstance(cols, Tensor) else type(cols).__name__}")
    args = tuple(_pair(n, v) for n, v in (("output_size", output_size), ("kernel_size", kernel_size),
                                          ("dilation", dilation), ("padding", padding), ("stride", stride)))
    if cols.dtype not in (torch.float32, torch.float64) or functorch_active() or dual_level_active():
        return _reference.col2im(cols, *args)  # ATen's own (other dtypes, transforms): its checks, its errors
    (h, w), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = args
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1 if sh > 0 else 0
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1 if sw > 0 else 0
    if min(h, w, kh, kw, dh, dw, sh, sw) <= 0 or min(ph, pw) < 0 or oh <= 0 or ow <= 0 \
            or cols.shape[2] != oh * ow or cols.shape[1] % (kh * kw) != 0:
        raise ValueError(f"col2im: cols of shape {tuple(cols.shape)} does not match an output of {h}x{w} with kernel "
                         f"{kh}x{kw}, dilation {(dh, dw)}, padding {(ph, pw)}, stride {(sh, sw)} "
                         f"(expected [N, C*{kh * kw}, {max(oh, 0) * max(ow, 0)}])")
    cols = cols.contiguous()
    if cols.requires_grad and torch.is_grad_enabled():
        return _Col2Im.apply(cols, args)
    return backend.helper_kernel("col2im", cols.device)(cols, *args)


__all__ = ["col2im", "KERNEL_OPS"]
