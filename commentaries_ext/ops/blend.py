"""Masked blending ``out = m * x_a + (1 - m) * x_b`` (DESIGN.md 4.2).

Public function
---------------
``masked_blend(x_a, m, x_b=None, perm=None) -> Tensor`` -- differentiable
w.r.t. ``x_a``, ``x_b`` and ``m``.  The partner is ``x_b`` (a second tensor),
``x_a[perm]`` (``x_b`` None: a gathered partner, never materialised) or
``x_b[perm]``; ``m`` is per example ``[N]``, or has ``x_a``'s rank with every
dimension 1 or equal to ``x_a``'s (per pixel ``[N,1,H,W]``, per channel
``[N,C,1,1]``, ...).  ``x_b`` and ``perm`` both None: the partner is zero.

Kernel ops (same signature in every backend: ``reference``, ``cpp``,
``triton``, ``cuda``)
-----------------------------------------------------------------------
Validated input (the public function guarantees it):

* ``x_a [N, ...]`` float32/float64 (bfloat16/float16 on GPU, float32 math),
  contiguous, or channels-last when 4-D (``x_a.is_contiguous()`` or
  ``x_a.is_contiguous(memory_format=torch.channels_last)``);
* ``x_b`` None or ``[M, ...]`` with ``x_a``'s dtype, device, trailing sizes and
  the same strides for the trailing dimensions (same memory format), dense rows
  (``x_b.stride(0)`` = elements per row); without ``perm``, ``M == N``;
* ``perm`` None or contiguous int64 ``[N]`` with values in ``[0, M)`` (``M = N``
  when ``x_b`` is None); repeats and fixed points allowed;
* ``m``: ``x_a``'s rank and dtype, ``m.size(0) == N``, every other dimension
  1 or equal to ``x_a``'s; **any strides** (an expanded, stride-0 ``m`` is fine);
* at least one of ``x_b``, ``perm`` is given;
* ``grad`` has ``x_a``'s shape and strides.

The kernels that address memory themselves (``cpp``, ``triton``, ``cuda``) check
the partner's layout and ``perm``'s dtype and shape, so that a direct call with a
bad partner is an error, not an access out of bounds; ``cpp`` also checks
``perm``'s range (on a GPU that would synchronise with the host: there it is
``masked_blend``'s check).

With ``xb = (x_a if x_b is None else x_b)[perm]`` (no gather when ``perm`` is None):

``blend_forward(Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm) -> Tensor``
    ``out = m * x_a + (1 - m) * xb`` (so a 0/1 mask gives ``x_a`` or ``xb`` exactly; a term beyond
    the dtype's range, from a mask far outside [0, 1], gives inf or NaN), a new
    tensor with ``x_a``'s shape and strides (``torch.empty_like(x_a)``).

``blend_backward(Tensor grad, Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm, bool[3] output_mask) -> (Tensor, Tensor, Tensor)``
    ``(grad_x_a, grad_x_b, grad_m)``; an output not asked for by ``output_mask``
    is an empty tensor ``[0]`` (of ``x_a``'s dtype and device):

    * ``grad_x_a = grad * m`` (``empty_like(x_a)``); when ``x_b`` is None and
      ``perm`` is given, plus the scattered partner term:
      ``grad_x_a[i] += sum_{n: perm[n] = i} grad[n] * (1 - m[n])`` (repeats accumulate);
    * ``grad_x_b`` (only when ``x_b`` is given, else ``[0]``):
      ``grad * (1 - m)`` without ``perm``; with ``perm``,
      ``grad_x_b[i] = sum_{n: perm[n] = i} grad[n] * (1 - m[n])`` (zero rows for
      rows never picked); ``empty_like(x_b)`` strides;
    * ``grad_m``: ``grad * (x_a - xb)`` summed over the dimensions where ``m``
      has size 1 (keepdim), shape ``m.shape``, **contiguous**, ``m``'s dtype.

Double backward (``create_graph=True``) runs the backward as differentiable
PyTorch ops. Forward-mode AD and ``torch.func.grad``/``vjp``/``jvp`` work;
``torch.func.vmap`` does not (no batching rule).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _compiled, backend
from .._transforms import dual_level_active as _dual_level_active
from .._transforms import functorch_active as _functorch_active
from ..reference import blend as _reference  # noqa: F401  (registers the reference backend)

try:  # Triton kernels (another engineer's file); optional
    from ..triton_kernels import blend as _triton  # noqa: F401
except Exception:  # pragma: no cover - missing triton or module not written yet
    _triton = None

KERNEL_OPS = ("blend_forward", "blend_backward")
_compiled.register_kernel_ops(KERNEL_OPS)

_FLOATS_CPU = (torch.float32, torch.float64)
_FLOATS_GPU = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------- fake impls of the kernel ops


def _fake_forward(x_a, m, x_b, perm):
    return torch.empty_like(x_a)


def _fake_backward(grad, x_a, m, x_b, perm, output_mask):
    gxa = torch.empty_like(x_a) if output_mask[0] else x_a.new_empty(0)
    gxb = torch.empty_like(x_b) if (output_mask[1] and x_b is not None) else x_a.new_empty(0)
    gm = m.new_empty(m.shape) if output_mask[2] else x_a.new_empty(0)
    return gxa, gxb, gm


for _prefix in ("cpp_", "cuda_"):
    if _compiled.loaded():
        if _compiled._has_op(_prefix + "blend_forward"):
            torch.library.register_fake("commentaries_ext::" + _prefix + "blend_forward")(_fake_forward)
        if _compiled._has_op(_prefix + "blend_backward"):
            torch.library.register_fake("commentaries_ext::" + _prefix + "blend_backward")(_fake_backward)


# ----------------------------------------------------------------- device-independent ops


@torch.library.custom_op("commentaries_ext::masked_blend", mutates_args=())
def masked_blend_op(x_a: Tensor, m: Tensor, x_b: Optional[Tensor], perm: Optional[Tensor]) -> Tensor:
    """The device-independent forward op (validated input; see the module docstring)."""
    return backend.kernel("blend_forward", x_a.device)(x_a, m, x_b, perm)


@masked_blend_op.register_fake
def _(x_a, m, x_b, perm):
    return torch.empty_like(x_a)


@torch.library.custom_op("commentaries_ext::masked_blend_backward", mutates_args=())
def masked_blend_backward_op(grad: Tensor, x_a: Tensor, m: Tensor, x_b: Optional[Tensor], perm: Optional[Tensor],
                             output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The device-independent backward op (validated input; see the module docstring)."""
    gxa, gxb, gm = backend.kernel("blend_backward", grad.device)(grad, x_a, m, x_b, perm, list(output_mask))
    return gxa, gxb, gm


@masked_blend_backward_op.register_fake
def _(grad, x_a, m, x_b, perm, output_mask):
    return _fake_backward(grad, x_a, m, x_b, perm, output_mask)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _setup_context(ctx, inputs, output):
    x_a, m, x_b, perm = inputs
    ctx.has_x_b = x_b is not None
    ctx.has_perm = perm is not None
    ctx.save_for_backward(x_a, m, x_b, perm)


def _backward_impl(ctx, grad, backward_kernel):
    x_a, m, x_b, perm = ctx.saved_tensors
    if not ctx.has_x_b:
        x_b = None
    if not ctx.has_perm:
        perm = None
    need_xa, need_m, need_xb = ctx.needs_input_grad[:3]
    need_xb = need_xb and x_b is not None
    needs = (need_xa, need_xb, need_m)  # in the order of the outputs of blend_backward
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad, x_a, m, x_b)):
        # create_graph=True: the backward itself must be differentiable
        gxa, gxb, gm = _reference.blend_backward_differentiable(grad, x_a, m, x_b, perm, needs)
    else:
        if grad.stride() != x_a.stride():
            grad = grad.contiguous(memory_format=_memory_format(x_a))
            if grad.stride() != x_a.stride():  # size-1 dimensions can leave ambiguous strides
                grad = torch.empty_like(x_a).copy_(grad)
        gxa, gxb, gm = backward_kernel(grad, x_a, m, x_b, perm, [bool(v) for v in needs])
    return (gxa if need_xa else None, gm if need_m else None, gxb if need_xb else None, None)


def _backward(ctx, grad):
    return _backward_impl(ctx, grad, masked_blend_backward_op)


masked_blend_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBlend(torch.autograd.Function):
    """The same forward/backward as the custom op, calling the kernels directly.

    Outside ``torch.compile`` this skips the custom-op layers (Python dispatch,
    pytree handling), about 50 us per forward+backward; traced code uses
    :func:`masked_blend_op` so that the graph holds the registered op. Written
    with ``setup_context`` and a ``jvp`` so that ``torch.func.grad``/``jvp`` and
    forward-mode AD work through it (``vmap`` does not: no batching rule)."""

    @staticmethod
    def forward(x_a, m, x_b, perm):
        return backend.kernel("blend_forward", x_a.device)(x_a, m, x_b, perm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_a, m, x_b, perm = inputs
        ctx.has_x_b = x_b is not None
        ctx.has_perm = perm is not None
        ctx.save_for_backward(x_a, m, x_b, perm)
        ctx.save_for_forward(x_a, m, x_b, perm)

    @staticmethod
    def backward(ctx, grad):
        return _backward_impl(ctx, grad, backend.kernel("blend_backward", grad.device))

    @staticmethod
    def jvp(ctx, t_xa, t_m, t_xb, t_perm):
        x_a, m, x_b, perm = ctx.saved_tensors
        x_b = x_b if ctx.has_x_b else None
        perm = perm if ctx.has_perm else None
        src = x_a if x_b is None else x_b
        t_src = t_xa if x_b is None else t_xb
        out = None
        if t_xa is not None:
            out = m * t_xa
        if t_src is not None:
            tp = t_src if perm is None else t_src.index_select(0, perm)
            out = (1 - m) * tp if out is None else out + (1 - m) * tp
        if t_m is not None:
            xb = src if perm is None else src.index_select(0, perm)
            out = t_m * (x_a - xb) if out is None else out + t_m * (x_a - xb)
        if out is None:
            return torch.zeros_like(x_a)
        return torch.empty_like(x_a).copy_(out)


# The C++ kernels with their backward registered in C++ (csrc/cpu/blend.cpp, AutogradCPU): the
# eager CPU path when the cpp backend runs blend_forward.  Forward-mode AD and torch.func use the
# Python Functions below (jvp rule, setup_context).
_CPP_AUTOGRAD = torch.ops.commentaries_ext.cpp_masked_blend.default \
    if _compiled.loaded() and _compiled._has_op("cpp_masked_blend") else None
if _CPP_AUTOGRAD is not None:
    torch.library.register_fake("commentaries_ext::cpp_masked_blend")(_fake_forward)


class _EagerBlendClassic(torch.autograd.Function):
    """:class:`_EagerBlend` as a classic ``forward(ctx, ...)`` Function, used outside
    ``torch.func`` transforms: its ``apply`` skips the argument binding
    (``inspect.signature``) that ``setup_context`` Functions pay on every call."""

    @staticmethod
    def forward(ctx, x_a, m, x_b, perm):
        out = _EagerBlend.forward(x_a, m, x_b, perm)
        _EagerBlend.setup_context(ctx, (x_a, m, x_b, perm), out)
        return out

    backward = _EagerBlend.backward
    jvp = _EagerBlend.jvp


# ----------------------------------------------------------------- public function


def _check_float(name: str, t: Tensor, device_type: str) -> None:
    allowed = _FLOATS_GPU if device_type != "cpu" else _FLOATS_CPU
    if t.dtype not in allowed:
        where = "on the GPU" if device_type != "cpu" else "on the CPU"
        raise TypeError(f"masked_blend: {name} has dtype {t.dtype}; {where} expected one of "
                        f"{[str(d).replace('torch.', '') for d in allowed]}")


def masked_blend(x_a: Tensor, m: Tensor, x_b: Tensor | None = None, perm: Tensor | None = None) -> Tensor:
    """``m * x_a + (1 - m) * partner`` with ``partner = x_b``, ``x_a[perm]`` or ``x_b[perm]``.

    ``x_a``: ``[N, ...]`` float32/float64 (bfloat16/float16 on GPU);
    ``m``: ``[N]`` (per example) or ``x_a``'s rank with each dimension 1 or
    equal to ``x_a``'s (per pixel ``[N,1,H,W]``, per channel ``[N,C,1,1]``);
    ``x_b``: ``x_a``'s shape, or ``[M, ...]`` when ``perm`` picks its rows;
    ``perm``: integer ``[N]`` of row indices (repeats allowed). Both ``x_b`` and
    ``perm`` None: the partner is zero. Differentiable w.r.t. ``x_a``, ``x_b``, ``m``.
    """
    if not isinstance(x_a, Tensor):
        raise TypeError(f"masked_blend: x_a must be a Tensor, got {type(x_a).__name__}")
    if not isinstance(m, Tensor):
        raise TypeError(f"masked_blend: m must be a Tensor, got {type(m).__name__}")
    if x_a.dim() < 1:
        raise ValueError(f"masked_blend: x_a must have a batch dimension, got shape {tuple(x_a.shape)}")
    dev = x_a.device
    _check_float("x_a", x_a, dev.type)
    if dev.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError("masked_blend: x_a is on the meta device (no data to compute on)")
    n = x_a.shape[0]
    if m.device != dev:
        raise ValueError(f"masked_blend: m is on {m.device} but x_a is on {dev}")
    if m.dtype != x_a.dtype:
        raise TypeError(f"masked_blend: m has dtype {m.dtype} but x_a has dtype {x_a.dtype}; cast m first")
    if m.dim() == 1 and x_a.dim() > 1:
        if m.shape[0] != n:
            raise ValueError(f"masked_blend: a per-example m must have shape [{n}], got {tuple(m.shape)}")
        m = m.view(n, *([1] * (x_a.dim() - 1)))
    if m.dim() != x_a.dim() or any(ms not in (1, xs) for ms, xs in zip(m.shape, x_a.shape)):
        raise ValueError(f"masked_blend: m of shape {tuple(m.shape)} does not broadcast to x_a of shape "
                         f"{tuple(x_a.shape)} (expected [N], or x_a's rank with each dimension 1 or equal)")
    if m.shape[0] != n:
        m = m.expand(n, *m.shape[1:])
    rows = n
    if x_b is not None:
        if not isinstance(x_b, Tensor):
            raise TypeError(f"masked_blend: x_b must be a Tensor or None, got {type(x_b).__name__}")
        if x_b.device != dev:
            raise ValueError(f"masked_blend: x_b is on {x_b.device} but x_a is on {dev}")
        if x_b.dtype != x_a.dtype:
            raise TypeError(f"masked_blend: x_b has dtype {x_b.dtype} but x_a has dtype {x_a.dtype}")
        if x_b.dim() != x_a.dim() or x_b.shape[1:] != x_a.shape[1:] or (perm is None and x_b.shape[0] != n):
            want = tuple(x_a.shape) if perm is None else ("M",) + tuple(x_a.shape[1:])
            raise ValueError(f"masked_blend: x_b has shape {tuple(x_b.shape)}, expected {want}")
        rows = x_b.shape[0]
    if perm is not None:
        if not isinstance(perm, Tensor):
            raise TypeError(f"masked_blend: perm must be a Tensor or None, got {type(perm).__name__}")
        if perm.device != dev:
            raise ValueError(f"masked_blend: perm is on {perm.device} but x_a is on {dev}")
        if perm.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"masked_blend: perm must be an integer tensor, got dtype {perm.dtype}")
        if perm.shape != (n,):
            raise ValueError(f"masked_blend: perm must have shape [{n}] (one partner row per example), "
                             f"got {tuple(perm.shape)}")
        perm = perm.to(torch.int64).contiguous()
        if n > 0 and torch.compiler.is_compiling():  # no data-dependent branch in a traced graph
            torch._assert_async(((perm >= 0) & (perm < rows)).all(),
                                f"masked_blend: perm holds a value out of range for {rows} rows")
        elif n > 0:
            lo, hi = (int(v) for v in torch.aminmax(perm))
            if lo < 0 or hi >= rows:
                bad = lo if lo < 0 else hi
                src = "x_a" if x_b is None else "x_b"
                raise IndexError(f"masked_blend: perm holds {bad}, out of range for {src} with {rows} rows "
                                 f"(valid: 0..{rows - 1})")
    if x_b is None and perm is None:
        return m * x_a  # zero partner
    fmt = _memory_format(x_a)
    x_a = x_a.contiguous(memory_format=fmt)
    if x_b is not None:
        x_b = x_b.contiguous(memory_format=fmt)
        if x_b.stride()[1:] != x_a.stride()[1:]:  # ambiguous strides (size-1 dimensions)
            x_a, x_b = x_a.contiguous(), x_b.contiguous()
    if x_a.numel() == 0:
        src = x_a if x_b is None else x_b
        partner = src if perm is None else src.index_select(0, perm)
        return m * x_a + (1 - m) * partner
    if torch.compiler.is_compiling():
        return masked_blend_op(x_a, m, x_b, perm)
    if _functorch_active():
        return _EagerBlend.apply(x_a, m, x_b, perm)
    if _CPP_AUTOGRAD is not None and dev.type == "cpu" and not _dual_level_active() \
            and backend.select("blend_forward", dev)[0] == "cpp":
        # forward and backward in C++ (no Python frame per call); its backward is the cpp kernel, chosen
        # here, where the Python Functions pick the backward's backend when the backward runs
        return _CPP_AUTOGRAD(x_a, m, x_b, perm)
    return _EagerBlendClassic.apply(x_a, m, x_b, perm)


__all__ = ["masked_blend", "masked_blend_op", "masked_blend_backward_op", "KERNEL_OPS"]
