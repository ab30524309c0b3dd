"""Weighted / blended softmax cross-entropy (DESIGN.md 4.1).

Public functions
----------------
``weighted_cross_entropy(logits, target, weight=None, *, reduction="mean", ignore_index=-100, check_finite=False)``
    ``sum_i w_i l_i`` (``"sum"``), ``sum_i w_i l_i / n_valid`` (``"mean"``: divided by the number of
    rows whose target is not ``ignore_index``, whatever the weights; 0/0 gives NaN like
    ``F.cross_entropy``) or ``w_i l_i`` (``"none"``), with ``l_i`` the unweighted per-example loss
    (0 on ignored rows). Differentiable w.r.t. ``logits`` and ``weight``, twice.
``blended_cross_entropy(logits, target_a, target_b, lam, weight=None, *, reduction="mean", ...)``
    the same with ``l_i = lam_i CE(z_i, a_i) + (1 - lam_i) CE(z_i, b_i)``; differentiable w.r.t.
    ``lam`` too.
``per_example_cross_entropy(logits, target, target_b=None, lam=None, *, ignore_index=-100)``
    the unweighted ``l_i`` ``[N]``.
``cross_entropy_hvp(logits, u, scale=None)``
    the loss-Hessian product ``scale_i (p_i * u_i - p_i (p_i . u_i))`` per row (``[N, C]``), the
    Hessian of ``l_i`` w.r.t. ``z_i`` times ``u_i`` (it does not depend on the target).
``cross_entropy_jvp(logits, target, t, target_b=None, lam=None, *, ignore_index=-100)``
    the per-row directional derivative ``(p_i - mix_i) . t_i`` ``[N]`` (0 on ignored rows).

Validation: every argument's type, dtype, device and shape, and the targets' range
(``0 <= y < C`` or ``y == ignore_index``), with errors naming the argument. NaN
logits are **not** checked by default (it costs a pass over the logits); pass
``check_finite=True`` to reject NaN and ``+inf`` logits (``-inf`` is allowed: a
class that is impossible). Half-precision logits are accepted on the GPU only.

Registration and overhead
-------------------------
The kernel ops ``wce_forward``/``wce_backward``/``wce_hvp``/``wce_jvp``
(DEVELOPING.md) are picked per call from :mod:`commentaries_ext.backend`.
``commentaries_ext::wce_*`` are ``torch.library.custom_op`` s over them with fake
and autograd registrations (``torch.compile`` and ``opcheck`` use them). In eager
mode the public functions use ``torch.autograd.Function`` s with the same
formulas calling the kernels directly (``setup_context`` + ``jvp``, so forward AD
and ``torch.func.grad``/``vjp``/``jvp`` work; ``torch.func.vmap`` does not: the
Functions have no batching rule and the target check reads values): the custom-op
layer costs ~25 us per op call here (Python dispatch, pytree), which at C=10 would
be most of the time.

Derivatives (all composed of the four kernel ops, so any order works):
``d loss/d z = g (p - mix)`` (wce_backward); ``d loss/d lam = z[yb] - z[y]``;
``wce_backward``: w.r.t. ``z`` it is ``wce_hvp`` with ``scale = g`` (zero on ignored rows;
the dependence through ``lse`` is folded in, so ``lse`` is treated as non-differentiable
everywhere), w.r.t. ``g`` ``wce_jvp``, w.r.t. ``lam`` two gathers; ``wce_jvp`` w.r.t. ``t``
is ``wce_backward``, w.r.t. ``z`` ``wce_hvp``; ``wce_hvp`` w.r.t. ``u`` is itself, w.r.t.
``z``/``scale`` plain PyTorch formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _compiled, backend
from .._transforms import dual_level_active as _dual_level_active
from .._transforms import functorch_active as _functorch_active
from ..reference import cross_entropy as _reference  # noqa: F401  (registers the reference backend)

try:  # Triton kernels (another engineer's file); optional
    from ..triton_kernels import cross_entropy as _triton  # noqa: F401
except Exception:  # pragma: no cover
    _triton = None

KERNEL_OPS = ("wce_forward", "wce_backward", "wce_hvp", "wce_jvp")
_compiled.register_kernel_ops(KERNEL_OPS)

_FLOATS_CPU = (torch.float32, torch.float64)
_FLOATS_GPU = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def _row_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------- fake impls of the kernel ops


def _fake_forward(logits, target, target_b, lam, ignore_index):
    n = logits.shape[0]
    rd = _row_dtype(logits.dtype)
    return logits.new_empty(n, dtype=rd), logits.new_empty(n, dtype=rd)


def _fake_backward(grad_loss, logits, lse, target, target_b, lam, ignore_index):
    return logits.new_empty(logits.shape)


def _fake_hvp(logits, lse, scale, u):
    return logits.new_empty(logits.shape)


def _fake_jvp(logits, lse, target, target_b, lam, t, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=_row_dtype(logits.dtype))


def _fake_forward_grad(logits, target, target_b, lam, row_scale, ignore_index):
    loss, lse = _fake_forward(logits, target, target_b, lam, ignore_index)
    return loss, lse, logits.new_empty(logits.shape)


def _fake_softmax_hvp(logits, scale, u):
    return logits.new_empty(logits.shape)


_FAKES = {"wce_forward": _fake_forward, "wce_backward": _fake_backward, "wce_hvp": _fake_hvp, "wce_jvp": _fake_jvp,
          "wce_forward_grad": _fake_forward_grad, "wce_softmax_hvp": _fake_softmax_hvp}

if _compiled.loaded():
    for _prefix in ("cpp_", "cuda_"):
        for _op, _fake in _FAKES.items():
            if _compiled._has_op(_prefix + _op):
                try:
                    torch.library.register_fake("commentaries_ext::" + _prefix + _op)(_fake)
                except RuntimeError:  # pragma: no cover - already registered (e.g. by the CUDA binding's module)
                    pass


# ----------------------------------------------------------------- shared derivative formulas


def _valid(target: Tensor, ignore_index: int) -> Tensor:
    return target != ignore_index


def _gather_diff(x: Tensor, target: Tensor, target_b: Tensor, valid: Tensor) -> Tensor:
    """``x[i, yb_i] - x[i, y_i]`` on valid rows, 0 elsewhere (differentiable in ``x``)."""
    y = torch.where(valid, target, 0)[:, None]
    yb = torch.where(valid, target_b, 0)[:, None]
    return torch.where(valid, x.gather(1, yb).squeeze(1) - x.gather(1, y).squeeze(1), 0.0)


def _scatter_mix_diff(g: Tensor, target: Tensor, target_b: Tensor, valid: Tensor, shape) -> Tensor:
    """``g_i (e_{yb_i} - e_{y_i})`` as ``[N, C]`` (0 on ignored rows)."""
    g = torch.where(valid, g, 0.0)
    y = torch.where(valid, target, 0)[:, None]
    yb = torch.where(valid, target_b, 0)[:, None]
    out = g.new_zeros(shape)
    out.scatter_add_(1, yb, g[:, None])
    out.scatter_add_(1, y, -g[:, None])
    return out


def _hvp_grads(z: Tensor, lse: Tensor, scale: Tensor, u: Tensor, v: Tensor, need_z: bool, need_s: bool):
    """Gradients of ``<v, wce_hvp(z, lse, scale, u)>`` w.r.t. ``z`` and ``scale`` (plain PyTorch)."""
    p = torch.softmax(z, dim=1)  # not exp(z - lse): lse is held constant, softmax differentiates exactly
    a = (p * u).sum(1, keepdim=True)
    gz = gs = None
    if need_s:
        gs = (v * p * (u - a)).sum(1)
    if need_z:
        b = (p * v).sum(1, keepdim=True)
        c = (p * v * u).sum(1, keepdim=True)
        gz = scale[:, None] * p * (v * u - a * v - b * u + 2 * a * b - c)
    return gz, gs


class _Kernels:
    """The four differentiable kernel ops of one mode (eager Functions or custom ops)."""

    def __init__(self, forward, backward, hvp, jvp):
        self.forward, self.backward, self.hvp, self.jvp = forward, backward, hvp, jvp


def _forward_grads(K: _Kernels, saved, ignore_index, needs, g_loss):
    z, target, target_b, lam, lse = saved
    gz = glam = None
    if needs[0]:
        g_rows = g_loss
        if torch.is_grad_enabled():  # gz will be differentiated: no inf * 0 from an ignored row (a mean over no rows)
            g_rows = torch.where(_valid(target, ignore_index), g_loss, 0.0)
        gz = K.backward(g_rows, z, lse, target, target_b, lam, ignore_index)
    if needs[3] and lam is not None:
        glam = g_loss * _gather_diff(z, target, target_b, _valid(target, ignore_index))
    return gz, glam


def _backward_grads(K: _Kernels, saved, ignore_index, needs, v):
    g, z, lse, target, target_b, lam = saved
    gg = gz = glam = None
    valid = _valid(target, ignore_index)
    if needs[0]:
        gg = K.jvp(z, lse, target, target_b, lam, v, ignore_index)
    if needs[1]:
        gz = K.hvp(z, lse, torch.where(valid, g, 0.0), v)
    if needs[5] and lam is not None:
        glam = g * _gather_diff(v, target, target_b, valid)
    return gg, gz, glam


def _jvp_grads(K: _Kernels, saved, ignore_index, needs, v):
    z, lse, target, target_b, lam, t = saved
    gz = gt = glam = None
    valid = _valid(target, ignore_index)
    if needs[0]:
        gz = K.hvp(z, lse, torch.where(valid, v, 0.0), t)
    if needs[5]:
        gt = K.backward(v, z, lse, target, target_b, lam, ignore_index)
    if needs[4] and lam is not None:
        glam = v * _gather_diff(t, target, target_b, valid)
    return gz, gt, glam


def _hvp_op_grads(K: _Kernels, saved, needs, v):
    z, lse, scale, u = saved
    gu = None
    if needs[3]:
        gu = K.hvp(z, lse, scale, v)
    gz, gs = _hvp_grads(z.to(v.dtype), lse, scale, u, v, needs[0], needs[2])
    return gz, gs, gu


# ----------------------------------------------------------------- eager autograd.Functions


_KCACHE: dict = {}


_KCACHE_GENERATION = -1  # backend.generation when _KCACHE was last emptied


def _cache_key(op: str, device) -> tuple:
    """(op, device type, forced backend): what a backend lookup depends on besides the registered
    kernels; a registration since the last call empties the cache (every entry may be stale)."""
    global _KCACHE_GENERATION
    if _KCACHE_GENERATION != backend.generation:
        _KCACHE.clear()
        _KCACHE_GENERATION = backend.generation
    return op, device.type, backend.forced()


def _k(op: str, device) -> callable:
    """``backend.kernel(op, device)``, cached."""
    key = _cache_key(op, device)
    fn = _KCACHE.get(key)
    if fn is None:
        fn = _KCACHE[key] = backend.kernel(op, device)
    return fn


def _eager(setup_cls, op: str):
    """The differentiable callable of one kernel op in eager mode.

    ``setup_cls`` is an ``autograd.Function`` written with ``setup_context`` (needed by
    ``torch.func`` transforms); outside them a classic ``forward(ctx, ...)`` twin runs
    (about 20 us cheaper per call), and with grad mode off (a first-order backward) the
    kernel is called directly."""

    class Classic(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out = setup_cls.forward(*inputs)
            setup_cls.setup_context(ctx, inputs, out)
            return out

        backward = setup_cls.backward
        jvp = setup_cls.jvp

    Classic.__name__ = Classic.__qualname__ = setup_cls.__name__ + "Classic"
    classic_apply, setup_apply = Classic.apply, setup_cls.apply

    def call(*args):
        if _functorch_active():
            return setup_apply(*args)
        if not torch.is_grad_enabled() and not _dual_level_active():
            return _k(op, args[1].device)(*args)
        return classic_apply(*args)

    call.classic = Classic
    return call


class _Forward(torch.autograd.Function):
    @staticmethod
    def forward(z, target, target_b, lam, ignore_index):
        return _k("wce_forward", z.device)(z, target, target_b, lam, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, target, target_b, lam, ignore_index = inputs
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(z, target, target_b, lam, output[1])
        ctx.save_for_forward(z, target, target_b, lam, output[1])

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        needs = ctx.needs_input_grad
        gz, glam = _forward_grads(EAGER, ctx.saved_tensors, ctx.ignore_index, needs, g_loss)
        return gz, None, None, glam, None

    @staticmethod
    def jvp(ctx, t_z, t_y, t_yb, t_lam, t_ii):
        z, target, target_b, lam, lse = ctx.saved_tensors
        out = None
        if t_z is not None:
            out = EAGER.jvp(z, lse, target, target_b, lam, t_z, ctx.ignore_index)
        if t_lam is not None and lam is not None:
            d = t_lam * _gather_diff(z, target, target_b, _valid(target, ctx.ignore_index))
            out = d if out is None else out + d
        if out is None:
            out = torch.zeros_like(lse)
        return out, None


class _Backward(torch.autograd.Function):
    @staticmethod
    def forward(g, z, lse, target, target_b, lam, ignore_index):
        return _k("wce_backward", z.device)(g, z, lse, target, target_b, lam, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, z, lse, target, target_b, lam, ignore_index = inputs
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(g, z, lse, target, target_b, lam)
        ctx.save_for_forward(g, z, lse, target, target_b, lam)

    @staticmethod
    def backward(ctx, v):
        gg, gz, glam = _backward_grads(EAGER, ctx.saved_tensors, ctx.ignore_index, ctx.needs_input_grad, v)
        return gg, gz, None, None, None, glam, None

    @staticmethod
    def jvp(ctx, t_g, t_z, t_lse, t_y, t_yb, t_lam, t_ii):
        g, z, lse, target, target_b, lam = ctx.saved_tensors
        ii = ctx.ignore_index
        valid = _valid(target, ii)
        out = None
        if t_g is not None:
            out = EAGER.backward(t_g, z, lse, target, target_b, lam, ii)
        if t_z is not None:
            d = EAGER.hvp(z, lse, torch.where(valid, g, 0.0), t_z)
            out = d if out is None else out + d
        if t_lam is not None and lam is not None:
            d = _scatter_mix_diff(g * t_lam, target, target_b, valid, z.shape).to(z.dtype)
            out = d if out is None else out + d
        return torch.zeros_like(z) if out is None else out


class _Hvp(torch.autograd.Function):
    @staticmethod
    def forward(z, lse, scale, u):
        return _k("wce_hvp", z.device)(z, lse, scale, u)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, v):
        gz, gs, gu = _hvp_op_grads(EAGER, ctx.saved_tensors, ctx.needs_input_grad, v)
        return gz, None, gs, gu

    @staticmethod
    def jvp(ctx, t_z, t_lse, t_s, t_u):
        z, lse, scale, u = ctx.saved_tensors
        out = None
        if t_u is not None:
            out = EAGER.hvp(z, lse, scale, t_u)
        if t_s is not None:
            d = t_s[:, None] * EAGER.hvp(z, lse, torch.ones_like(scale), u)
            out = d if out is None else out + d
        if t_z is not None:
            # the derivative of z -> H(z) u is symmetric in (u, t_z): reuse the z-gradient formula
            d, _ = _hvp_grads(z, lse, scale, u, t_z, True, False)
            out = d if out is None else out + d
        return torch.zeros_like(z) if out is None else out


class _Jvp(torch.autograd.Function):
    @staticmethod
    def forward(z, lse, target, target_b, lam, t, ignore_index):
        return _k("wce_jvp", z.device)(z, lse, target, target_b, lam, t, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, lse, target, target_b, lam, t, ignore_index = inputs
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(z, lse, target, target_b, lam, t)
        ctx.save_for_forward(z, lse, target, target_b, lam, t)

    @staticmethod
    def backward(ctx, v):
        gz, gt, glam = _jvp_grads(EAGER, ctx.saved_tensors, ctx.ignore_index, ctx.needs_input_grad, v)
        return gz, None, None, None, glam, gt, None

    @staticmethod
    def jvp(ctx, t_z, t_lse, t_y, t_yb, t_lam, t_t, t_ii):
        z, lse, target, target_b, lam, t = ctx.saved_tensors
        ii = ctx.ignore_index
        valid = _valid(target, ii)
        out = None
        if t_t is not None:
            out = EAGER.jvp(z, lse, target, target_b, lam, t_t, ii)
        if t_z is not None:
            d = (EAGER.hvp(z, lse, valid.to(z.dtype), t) * t_z).sum(1)
            out = d if out is None else out + d
        if t_lam is not None and lam is not None:
            d = t_lam * _gather_diff(t, target, target_b, valid)
            out = d if out is None else out + d
        return torch.zeros_like(lse) if out is None else out


EAGER = _Kernels(_eager(_Forward, "wce_forward"), _eager(_Backward, "wce_backward"), _eager(_Hvp, "wce_hvp"),
                 _eager(_Jvp, "wce_jvp"))


# ----------------------------------------------------------------- device-independent custom ops


@torch.library.custom_op("commentaries_ext::wce_forward", mutates_args=())
def wce_forward_op(logits: Tensor, target: Tensor, target_b: Optional[Tensor], lam: Optional[Tensor],
                   ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(loss, lse)`` per row (validated input; DEVELOPING.md)."""
    return _k("wce_forward", logits.device)(logits, target, target_b, lam, ignore_index)


@torch.library.custom_op("commentaries_ext::wce_backward", mutates_args=())
def wce_backward_op(grad_loss: Tensor, logits: Tensor, lse: Tensor, target: Tensor, target_b: Optional[Tensor],
                    lam: Optional[Tensor], ignore_index: int) -> Tensor:
    """``grad_loss_i (p_i - mix_i)`` ``[N, C]``."""
    return _k("wce_backward", logits.device)(grad_loss, logits, lse, target, target_b, lam, ignore_index)


@torch.library.custom_op("commentaries_ext::wce_hvp", mutates_args=())
def wce_hvp_op(logits: Tensor, lse: Tensor, scale: Tensor, u: Tensor) -> Tensor:
    """``scale_i (p_i * u_i - p_i (p_i . u_i))`` ``[N, C]``."""
    return _k("wce_hvp", logits.device)(logits, lse, scale, u)


@torch.library.custom_op("commentaries_ext::wce_jvp", mutates_args=())
def wce_jvp_op(logits: Tensor, lse: Tensor, target: Tensor, target_b: Optional[Tensor], lam: Optional[Tensor],
               t: Tensor, ignore_index: int) -> Tensor:
    """``(p_i - mix_i) . t_i`` ``[N]``."""
    return _k("wce_jvp", logits.device)(logits, lse, target, target_b, lam, t, ignore_index)


wce_forward_op.register_fake(_fake_forward)
wce_backward_op.register_fake(_fake_backward)
wce_hvp_op.register_fake(_fake_hvp)
wce_jvp_op.register_fake(_fake_jvp)

OPS = _Kernels(wce_forward_op, wce_backward_op, wce_hvp_op, wce_jvp_op)


def _fwd_setup(ctx, inputs, output):
    z, target, target_b, lam, ignore_index = inputs
    ctx.ignore_index = ignore_index
    ctx.has_mix = target_b is not None and lam is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(z, target, target_b if ctx.has_mix else None, lam if ctx.has_mix else None, output[1])


def _fwd_bwd(ctx, g_loss, g_lse):
    z, target, target_b, lam, lse = ctx.saved_tensors
    if not ctx.has_mix:
        target_b = lam = None
    gz, glam = _forward_grads(OPS, (z, target, target_b, lam, lse), ctx.ignore_index, ctx.needs_input_grad, g_loss)
    return gz, None, None, glam, None


def _bwd_setup(ctx, inputs, output):
    g, z, lse, target, target_b, lam, ignore_index = inputs
    ctx.ignore_index = ignore_index
    ctx.has_mix = target_b is not None and lam is not None
    ctx.save_for_backward(g, z, lse, target, target_b if ctx.has_mix else None, lam if ctx.has_mix else None)


def _bwd_bwd(ctx, v):
    g, z, lse, target, target_b, lam = ctx.saved_tensors
    if not ctx.has_mix:
        target_b = lam = None
    gg, gz, glam = _backward_grads(OPS, (g, z, lse, target, target_b, lam), ctx.ignore_index,
                                   ctx.needs_input_grad, v)
    return gg, gz, None, None, None, glam, None


def _hvp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _hvp_bwd(ctx, v):
    gz, gs, gu = _hvp_op_grads(OPS, ctx.saved_tensors, ctx.needs_input_grad, v)
    return gz, None, gs, gu


def _jvp_setup(ctx, inputs, output):
    z, lse, target, target_b, lam, t, ignore_index = inputs
    ctx.ignore_index = ignore_index
    ctx.has_mix = target_b is not None and lam is not None
    ctx.save_for_backward(z, lse, target, target_b if ctx.has_mix else None, lam if ctx.has_mix else None, t)


def _jvp_bwd(ctx, v):
    z, lse, target, target_b, lam, t = ctx.saved_tensors
    if not ctx.has_mix:
        target_b = lam = None
    gz, gt, glam = _jvp_grads(OPS, (z, lse, target, target_b, lam, t), ctx.ignore_index, ctx.needs_input_grad, v)
    return gz, None, None, None, glam, gt, None


wce_forward_op.register_autograd(_fwd_bwd, setup_context=_fwd_setup)
wce_backward_op.register_autograd(_bwd_bwd, setup_context=_bwd_setup)
wce_hvp_op.register_autograd(_hvp_bwd, setup_context=_hvp_setup)
wce_jvp_op.register_autograd(_jvp_bwd, setup_context=_jvp_setup)


def _kernels() -> _Kernels:
    return OPS if torch.compiler.is_compiling() else EAGER


# ----------------------------------------------------------------- first-order fast path of reduced losses

# ``wce_forward_grad(logits, target, target_b, lam, row_scale, ignore_index) -> (loss, lse, grad)``:
# wce_forward's outputs plus ``grad_i = row_scale_i (p_i - mix_i)`` (row_scale None: 1; zero rows
# where ignored) from the same pass over the logits. A reduced loss ``sum_i s_i l_i`` then needs
# no backward kernel: its gradient w.r.t. the logits is ``grad`` times the incoming scalar. CPU
# backends only (on a GPU the two passes are memory-bound and exp is cheap).
# ``wce_softmax_hvp(logits, scale, u)``: wce_hvp with the softmax computed in the same pass (one
# exp pass instead of the lse's forward pass plus wce_hvp's); used when no derivative of the
# product is needed.
FUSED_OPS = ("wce_forward_grad", "wce_softmax_hvp")
_compiled.register_kernel_ops(FUSED_OPS)
def _fused_kernel(device, op: str = "wce_forward_grad"):
    """Fused op ``op`` of the backend that runs ``wce_forward`` on ``device``, or None (cached)."""
    key = ("fused",) + _cache_key(op, device)
    try:
        return _KCACHE[key]  # (may be None: no fused kernel)
    except KeyError:
        fn = _KCACHE[key] = backend.optional_kernel(op, "wce_forward", device)
        return fn


class _ReducedCE(torch.autograd.Function):
    """``sum_i w_i l_i [/ denom]`` with its logits gradient computed in the forward pass.

    First-order backward: the saved gradient times the incoming scalar (no kernel). With
    ``create_graph`` the backward is the differentiable composition of the kernel ops (as
    the unfused path), so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, z, weight, lam, target, target_b, denom, ignore_index, kern):
        n = z.shape[0]
        scale = weight
        if denom is not None:
            ones = torch.ones(n, dtype=_row_dtype(z.dtype), device=z.device)
            scale = (ones if weight is None else weight) / denom
        loss, lse, grad = kern(z, target, target_b, lam, scale, ignore_index)
        ctx.save_for_backward(z, weight, lam)
        ctx.target, ctx.target_b, ctx.denom, ctx.ignore_index = target, target_b, denom, ignore_index
        ctx.lse, ctx.loss, ctx.scale, ctx.grad, ctx.kern = lse, loss, scale, grad, kern
        total = loss.sum() if weight is None else torch.dot(loss, weight)
        return total if denom is None else total / denom

    @staticmethod
    def backward(ctx, g):
        z, weight, lam = ctx.saved_tensors
        need_z, need_w, need_lam = ctx.needs_input_grad[:3]
        target, target_b, denom, ii = ctx.target, ctx.target_b, ctx.denom, ctx.ignore_index
        gz = gw = glam = None
        if torch.is_grad_enabled():  # create_graph: differentiable in g, z, weight and lam
            row = weight if weight is not None else torch.ones_like(ctx.loss)
            g_loss = g * (row if denom is None else row / denom)
            gz, glam = _forward_grads(EAGER, (z, target, target_b, lam, ctx.lse), ii,
                                      (need_z, False, False, need_lam), g_loss)
            if need_w:
                loss = EAGER.forward(z, target, target_b, lam, ii)[0]
                gw = g * (loss if denom is None else loss / denom)
            return gz, gw, glam, None, None, None, None, None
        scale = ctx.scale if ctx.scale is not None else torch.ones_like(ctx.loss)
        if need_z:
            grad, ctx.grad = ctx.grad, None  # handed over: autograd may keep it as .grad without a copy
            if grad is None:  # a second backward through a retained graph: the same values again
                grad = ctx.kern(z, target, target_b, lam, ctx.scale, ii)[2]
            if not (g.device.type == "cpu" and float(g) == 1.0):
                grad.mul_(g)
            gz = grad
        if need_lam and lam is not None:
            glam = (g * scale) * _gather_diff(z, target, target_b, _valid(target, ii))
        if need_w:
            gw = g * (ctx.loss if denom is None else ctx.loss / denom)
        return gz, gw, glam, None, None, None, None, None


# The same reduced loss with its backward registered in C++ (csrc/cpu/cross_entropy_autograd.cpp,
# AutogradCPU): what _ReducedCE does, without a Python frame in the forward or the backward. Used
# when the backend's fused kernel is the cpp one.
_CPP_REDUCED = torch.ops.commentaries_ext.cpp_wce_reduced.default \
    if _compiled.loaded() and _compiled._has_op("cpp_wce_reduced") else None
if _CPP_REDUCED is not None:
    @torch.library.register_fake("commentaries_ext::cpp_wce_reduced")
    def _fake_reduced(logits, target, target_b, lam, weight, reduction, ignore_index):
        return logits.new_empty(())
_CPP_REDUCTION = {"sum": 0, "mean": 1}  # 2: the mean over the rows that are not ignored


def _fused_reduced_kernel(logits: Tensor, reduction: str):
    """How the reduced loss runs fused: ``"cpp"`` (the C++ autograd op), the backend's fused
    kernel (through :class:`_ReducedCE`), or None (eager autograd off, tracing, no kernel: the
    unfused path)."""
    if reduction == "none" or not (torch.is_grad_enabled() and logits.requires_grad) \
            or torch.compiler.is_compiling() or _functorch_active() or _dual_level_active():
        return None
    try:
        kern = _fused_kernel(logits.device)
    except RuntimeError:  # a forced backend that cannot run here: the unfused path reports it, after
        return None       # the class indices (as without a gradient)
    if kern is None:
        return None
    if _CPP_REDUCED is not None and kern is backend._kernels["cpp"].get("wce_forward_grad"):
        return "cpp"
    return kern


def _reduced_fast(fn: str, kern, logits: Tensor, target: Tensor, target_b, lam, weight, reduction: str,
                  ignore_index: int, maybe_ignored: bool):
    """The reduced loss through ``kern`` (from :func:`_fused_reduced_kernel`).

    On the ``"cpp"`` path the class indices were not range-checked in Python (``_check_target``
    with ``check_range=False``: its ``aminmax`` and two host reads are a tenth of a batch-128
    forward + backward): the kernel checks them before it computes anything, and on a failure
    the Python check runs to raise its own error. A mean counts the rows that are not ignored
    there too (a loop over the targets in C++)."""
    if kern == "cpp":
        code = 2 if reduction == "mean" else _CPP_REDUCTION[reduction]
        try:
            return _CPP_REDUCED(logits, target, target_b, lam, weight, code, ignore_index)
        except RuntimeError as err:
            error = err
        # (outside the except block: the Python check's error is not chained to the kernel's; the
        # finally drops the reference cycle error -> traceback -> this frame -> error, which kept
        # the logits alive until a garbage collection)
        try:
            _check_target_range(fn, "target" if target_b is None else "target_a", target, logits, ignore_index)
            if target_b is not None:
                _check_target_range(fn, "target_b", target_b, logits, ignore_index, rows_of=target)
            raise error
        finally:
            error = None
    denom = None
    if reduction == "mean":
        denom = (target != ignore_index).sum() if maybe_ignored else logits.shape[0]
    return _ReducedCE.apply(logits, weight, lam, target, target_b, denom, ignore_index, kern)


# ----------------------------------------------------------------- validation


def _check_logits(fn: str, logits, check_finite: bool) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{fn}: logits must be a Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    allowed = _FLOATS_CPU if logits.device.type == "cpu" else _FLOATS_GPU
    if logits.dtype not in allowed:
        raise TypeError(f"{fn}: logits has dtype {logits.dtype}; on {logits.device.type} expected one of "
                        f"{[str(d).replace('torch.', '') for d in allowed]}")
    if logits.device.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError(f"{fn}: logits is on the meta device (no data to compute on)")
    if logits.shape[1] == 0 and logits.shape[0] > 0:
        raise ValueError(f"{fn}: logits has no classes (shape {tuple(logits.shape)})")
    if check_finite and logits.numel() > 0 and not torch.compiler.is_compiling():
        m = logits.detach().max()
        if not bool(m < float("inf")):
            what = "NaN" if bool(torch.isnan(logits).any()) else "+inf"
            raise ValueError(f"{fn}: logits contains {what} (check_finite=True; -inf is allowed)")


def _check_target(fn: str, name: str, target, logits: Tensor, ignore_index: int,
                  rows_of: Tensor | None = None, check_range: bool = True) -> tuple[Tensor, bool]:
    """int64 target; also whether some row may be ignored (without ``check_range``, which leaves the
    class indices to :func:`_check_target_range` or a kernel, any non-empty target may: see
    :func:`_reduced_fast`).

    ``rows_of``: the (checked) first target when ``target`` is the second one (``target_b``):
    a row is ignored by its first target only, so ``target_b`` must be a class index on
    every row whose first target is not ``ignore_index`` (the kernels read ``z[i, yb_i]``)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(f"{fn}: {name} is on {target.device} but logits is on {logits.device}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor of class indices, got dtype {target.dtype}")
    n = logits.shape[0]
    if target.shape != (n,):
        raise ValueError(f"{fn}: {name} must have shape [{n}] (one class per row of logits), got "
                         f"{tuple(target.shape)}")
    if target.dtype != torch.int64:
        target = target.to(torch.int64)
    if not check_range:
        return target, n > 0
    return target, _check_target_range(fn, name, target, logits, ignore_index, rows_of)


def _check_target_range(fn: str, name: str, target: Tensor, logits: Tensor, ignore_index: int,
                        rows_of: Tensor | None = None) -> bool:
    """The class indices of a target that passed :func:`_check_target`'s other checks: IndexError
    naming the first one out of range on a row that is not ignored; else whether some row may be
    ignored."""
    n, c = logits.shape
    if n == 0:
        return False
    if torch.compiler.is_compiling():
        skip = (target if rows_of is None else rows_of) == ignore_index
        torch._assert_async((((target >= 0) & (target < c)) | skip).all(),
                            f"{fn}: {name} holds a class index out of range")
        return True
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo < 0 or hi >= c:
        if rows_of is None:
            bad = target[((target < 0) | (target >= c)) & (target != ignore_index)]
            if bad.numel():
                raise IndexError(f"{fn}: {name} holds {int(bad[0])}, out of range for {c} classes "
                                 f"(valid: 0..{c - 1}, or ignore_index={ignore_index})")
        else:
            bad = target[((target < 0) | (target >= c)) & (rows_of != ignore_index)]
            if bad.numel():
                raise IndexError(f"{fn}: {name} holds {int(bad[0])}, out of range for {c} classes on a row "
                                 f"that is not ignored (valid: 0..{c - 1}; a row is ignored by its first "
                                 f"target == ignore_index={ignore_index})")
    return lo <= ignore_index <= hi


def _check_row(fn: str, name: str, x, logits: Tensor) -> Tensor:
    n = logits.shape[0]
    if isinstance(x, (int, float)):
        return torch.full((n,), float(x), dtype=_row_dtype(logits.dtype), device=logits.device)
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor or a number, got {type(x).__name__}")
    if x.device != logits.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but logits is on {logits.device}")
    want = _row_dtype(logits.dtype)
    if x.dtype != want:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype} but must be {want} (the dtype of the per-row losses "
                        f"for {logits.dtype} logits); cast it first")
    if x.dim() == 0:
        return x.expand(n)
    if x.shape != (n,):
        raise ValueError(f"{fn}: {name} must have shape [{n}] (one value per row of logits), got {tuple(x.shape)}")
    return x


def _check_matrix(fn: str, name: str, x, logits: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(x).__name__}")
    if x.device != logits.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but logits is on {logits.device}")
    if x.dtype != logits.dtype:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype} but logits has dtype {logits.dtype}")
    if x.shape != logits.shape:
        raise ValueError(f"{fn}: {name} must have the shape of logits {tuple(logits.shape)}, got {tuple(x.shape)}")
    return x


def _reduce(fn: str, loss: Tensor, weight: Tensor | None, reduction: str, target: Tensor, ignore_index: int,
            maybe_ignored: bool) -> Tensor:
    if reduction == "none":
        return loss if weight is None else loss * weight
    s = loss.sum() if weight is None else torch.dot(loss, weight)
    if reduction == "sum":
        return s
    if maybe_ignored:
        return s / (target != ignore_index).sum()
    return s / loss.shape[0]


def _check_ignore_index(fn: str, ignore_index) -> int:
    if isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: ignore_index must be an int, got bool")
    if not isinstance(ignore_index, int):
        try:
            import operator

            ignore_index = operator.index(ignore_index)  # numpy / 0-dim integer tensors
        except TypeError:
            raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}") from None
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ValueError(f"{fn}: ignore_index={ignore_index} does not fit in int64")
    return int(ignore_index)


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ----------------------------------------------------------------- public functions


def per_example_cross_entropy(logits: Tensor, target: Tensor, target_b: Tensor | None = None,
                              lam: Tensor | float | None = None, *, ignore_index: int = -100,
                              check_finite: bool = False) -> Tensor:
    """Unweighted per-example (blended) cross-entropy ``[N]`` (0 on ignored rows)."""
    fn = "per_example_cross_entropy"
    ignore_index = _check_ignore_index(fn, ignore_index)
    _check_logits(fn, logits, check_finite)
    target, _ = _check_target(fn, "target", target, logits, ignore_index)
    if (target_b is None) != (lam is None):
        raise ValueError(f"{fn}: target_b and lam must be given together")
    if target_b is not None:
        target_b, _ = _check_target(fn, "target_b", target_b, logits, ignore_index, rows_of=target)
        lam = _check_row(fn, "lam", lam, logits)
    return _kernels().forward(logits, target, target_b, lam, int(ignore_index))[0]


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None, *,
                           reduction: str = "mean", ignore_index: int = -100, check_finite: bool = False) -> Tensor:
    """``sum_i w_i CE(z_i, y_i)`` reduced by ``reduction`` (see the module docstring).

    ``logits [N, C]`` float32/float64 (half on GPU), any strides; ``target [N]``
    integer; ``weight [N]`` (per example, the per-row loss dtype) or None.
    ``"mean"`` divides by the number of non-ignored rows."""
    fn = "weighted_cross_entropy"
    ignore_index = _check_ignore_index(fn, ignore_index)
    _check_reduction(fn, reduction)
    _check_logits(fn, logits, check_finite)
    target, _ = _check_target(fn, "target", target, logits, ignore_index, check_range=False)
    if weight is not None:
        weight = _check_row(fn, "weight", weight, logits)
    # every argument's type and shape first, then the class indices: the same order of errors
    # whether the C++ kernel or the Python check finds a bad index
    fused = _fused_reduced_kernel(logits, reduction)
    maybe_ignored = True if fused == "cpp" else _check_target_range(fn, "target", target, logits, ignore_index)
    if fused is not None:
        return _reduced_fast(fn, fused, logits, target, None, None, weight, reduction, int(ignore_index),
                             maybe_ignored)
    loss = _kernels().forward(logits, target, None, None, int(ignore_index))[0]
    return _reduce(fn, loss, weight, reduction, target, ignore_index, maybe_ignored)


def blended_cross_entropy(logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor | float,
                          weight: Tensor | None = None, *, reduction: str = "mean", ignore_index: int = -100,
                          check_finite: bool = False) -> Tensor:
    """``lam_i CE(z_i, a_i) + (1 - lam_i) CE(z_i, b_i)``, weighted and reduced like
    :func:`weighted_cross_entropy` (a row is ignored when ``target_a`` is ``ignore_index``).
    Differentiable w.r.t. ``logits``, ``lam`` and ``weight``."""
    fn = "blended_cross_entropy"
    ignore_index = _check_ignore_index(fn, ignore_index)
    _check_reduction(fn, reduction)
    _check_logits(fn, logits, check_finite)
    target_a, _ = _check_target(fn, "target_a", target_a, logits, ignore_index, check_range=False)
    target_b, _ = _check_target(fn, "target_b", target_b, logits, ignore_index, check_range=False)
    lam = _check_row(fn, "lam", lam, logits)
    if weight is not None:
        weight = _check_row(fn, "weight", weight, logits)
    fused = _fused_reduced_kernel(logits, reduction)  # (then the class indices, as weighted_cross_entropy)
    maybe_ignored = True
    if fused != "cpp":
        maybe_ignored = _check_target_range(fn, "target_a", target_a, logits, ignore_index)
        _check_target_range(fn, "target_b", target_b, logits, ignore_index, rows_of=target_a)
    if fused is not None:
        return _reduced_fast(fn, fused, logits, target_a, target_b, lam, weight, reduction, int(ignore_index),
                             maybe_ignored)
    loss = _kernels().forward(logits, target_a, target_b, lam, int(ignore_index))[0]
    return _reduce(fn, loss, weight, reduction, target_a, ignore_index, maybe_ignored)


def _lse(logits: Tensor) -> Tensor:
    """Row logsumexp by the forward kernel (faster than ``torch.logsumexp`` here); not differentiable.
    The targets are all ignored (-1 with ignore_index -1): no class is read."""
    z = logits.detach()
    target = torch.full((z.shape[0],), -1, dtype=torch.int64, device=z.device)
    if torch.compiler.is_compiling():
        return wce_forward_op(z, target, None, None, -1)[1]
    return _k("wce_forward", z.device)(z, target, None, None, -1)[1]


def cross_entropy_hvp(logits: Tensor, u: Tensor, scale: Tensor | float | None = None) -> Tensor:
    """The loss-Hessian product per row: ``scale_i (p_i * u_i - p_i (p_i . u_i))``, ``[N, C]``.

    ``u`` has the shape and dtype of ``logits``; ``scale [N]`` (or a number; None: 1).
    Differentiable w.r.t. ``logits``, ``u`` and ``scale``."""
    fn = "cross_entropy_hvp"
    _check_logits(fn, logits, False)
    u = _check_matrix(fn, "u", u, logits)
    scale = _check_row(fn, "scale", 1.0 if scale is None else scale, logits)
    no_derivative = not (torch.is_grad_enabled() and (logits.requires_grad or u.requires_grad or scale.requires_grad))
    if no_derivative and not torch.compiler.is_compiling() and not _functorch_active() and not _dual_level_active():
        kern = _fused_kernel(logits.device, "wce_softmax_hvp")
        if kern is not None:
            return kern(logits, scale, u)
    return _kernels().hvp(logits, _lse(logits), scale, u)


def cross_entropy_jvp(logits: Tensor, target: Tensor, t: Tensor, target_b: Tensor | None = None,
                      lam: Tensor | float | None = None, *, ignore_index: int = -100) -> Tensor:
    """Per-row directional derivative of the (blended) loss: ``(p_i - mix_i) . t_i``, ``[N]``
    (0 on ignored rows). Differentiable w.r.t. ``logits``, ``t`` and ``lam``."""
    fn = "cross_entropy_jvp"
    ignore_index = _check_ignore_index(fn, ignore_index)
    _check_logits(fn, logits, False)
    target, _ = _check_target(fn, "target", target, logits, ignore_index)
    t = _check_matrix(fn, "t", t, logits)
    if (target_b is None) != (lam is None):
        raise ValueError(f"{fn}: target_b and lam must be given together")
    if target_b is not None:
        target_b, _ = _check_target(fn, "target_b", target_b, logits, ignore_index, rows_of=target)
        lam = _check_row(fn, "lam", lam, logits)
    return _kernels().jvp(logits, _lse(logits), target, target_b, lam, t, int(ignore_index))


__all__ = [
    "weighted_cross_entropy", "blended_cross_entropy", "per_example_cross_entropy", "cross_entropy_hvp",
    "cross_entropy_jvp", "wce_forward_op", "wce_backward_op", "wce_hvp_op", "wce_jvp_op", "KERNEL_OPS",
]
