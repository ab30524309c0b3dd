"""Implicit-differentiation hypergradients (Algorithm 2).

    dL_V/dphi = dL_V/dphi|direct - d(g_T . p)/dphi ,   p ~= H^-1 v ,  v = dL_V/dtheta

``implicit_hypergradient`` computes ``v`` on the validation batch, ``p`` with a
Neumann series or conjugate gradients on the training batch's curvature, and
the mixed term; see the package docstring for the full API.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import vector as V
from .._stack import user_stacklevel
from ..memory import reuse_cpu_memory
from .hvp import make_operator, scalar_loss
from .pooling import pool_rules


class HypergradientDivergenceWarning(UserWarning):
    """The inverse-HVP solver diverged (or met negative curvature) and a fallback was used."""


class HypergradientDivergenceError(RuntimeError):
    """The inverse-HVP solver diverged and no fallback applied (``on_divergence='raise'``)."""


@dataclass
class NeumannConfig:
    """Neumann series ``p = alpha * sum_{j=0..K} (I - alpha (H + delta I))^j v``.

    ``alpha``: the step; ``None`` picks ``alpha = alpha_scale / lambda_max`` from a
    power-iteration estimate of the largest eigenvalue of ``H + delta I``,
    re-estimated every ``reestimate_every`` calls (warm-started from the last
    eigenvector, so re-estimates need only ``power_iters_warm`` products).
    ``damping``: ``delta``.  Divergence (a non-finite term, or a term whose norm
    grows by more than ``growth_tol`` relative -- impossible when the series
    converges, since ``H`` is symmetric) is handled by ``on_divergence``:

    * ``"fallback"`` (default): warn (:class:`HypergradientDivergenceWarning`)
      and recompute with ``alpha`` from power iteration and, if the Hessian is
      found indefinite, damping ``delta = -lambda_min + 1e-3 lambda_max``; if that
      still grows (power iteration underestimates ``|lambda_min|``), warn again and
      keep the partial sum up to the last non-growing term, as ``"truncate"`` does;
    * ``"raise"``: raise :class:`HypergradientDivergenceError` at once;
    * ``"truncate"``: warn and keep the partial sum up to the last non-growing term.

    ``growth_tol=None`` skips the per-term norms (one fused ``neumann_step_`` per
    term) and checks only that the result is finite.
    """

    K: int = 1
    alpha: float | None = 1e-3
    damping: float = 0.0
    alpha_scale: float = 1.0
    power_iters: int = 20
    power_iters_warm: int = 3
    reestimate_every: int = 50
    growth_tol: float = 1e-3
    on_divergence: str = "fallback"


@dataclass
class CGConfig:
    """Conjugate gradients on ``(H + delta I) p = v``; stops at ``max_iter`` or
    ``||r|| <= tol ||v||``.  Non-positive curvature ``c^T (H + delta I) c <= 0``
    (an indefinite Hessian) is handled by ``on_divergence``: ``"fallback"``
    warns and returns the last iterate (truncated CG; ``p = 0`` when the first
    direction ``v`` already has it, so the hypergradient is the direct term) --
    consider damping or ``curvature="gauss_newton"``; ``"raise"`` raises."""

    max_iter: int = 20
    tol: float = 1e-10
    damping: float = 0.0
    on_divergence: str = "fallback"


@dataclass
class EngineState:
    """State kept between hyper-steps (power-iteration estimate and warm start)."""

    calls: int = 0
    lambda_max: float | None = None
    eigvec: list | None = None
    estimated_at: int = -(10**9)


@dataclass
class HypergradResult:
    grads: dict  # name -> hypergradient (direct + indirect), like the hparams
    p: list  # the inverse-HVP vector (list like the params)
    v: list  # dL_V/dtheta
    val_loss: torch.Tensor
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- building blocks


def _synced(sync, *scalars):
    """The 0-dim ``scalars`` as one tensor, made identical on every rank by ``sync`` (if any)."""
    if sync is None:
        return scalars
    return sync(torch.stack([s.reshape(()) for s in scalars]))


def power_iteration(matvec: Callable, like: list, iters: int = 20, v0: list | None = None, tol: float = 1e-4,
                    sync: Callable | None = None):
    """Largest-magnitude eigenvalue (Rayleigh quotient) and eigenvector of a symmetric operator.

    ``sync(t)`` (several processes): makes a tensor of scalars identical on every rank,
    so that every rank stops after the same number of products."""
    if v0 is None:
        gen = torch.Generator(device=like[0].device).manual_seed(0) if like else None
        x = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in like]
    else:
        x = V.clone(v0)
    n = _synced(sync, V.norm(x))[0]
    x = V.scale(x, 1.0 / n)
    lam = 0.0
    used = 0
    for _ in range(iters):
        hx = matvec(x)
        used += 1
        s = _synced(sync, V.dot(x, hx), V.norm(hx))
        new, nh = float(s[0]), s[1]
        if not math.isfinite(new) or float(nh) == 0.0:
            lam = new
            break
        x = V.scale(hx, 1.0 / nh)
        if used > 1 and abs(new - lam) <= tol * abs(new):
            lam = new
            break
        lam = new
    return lam, x, used


def neumann(matvec: Callable, v: list, K: int, alpha: float, growth_tol: float | None = 1e-3, keep_partial: bool = False,
            sync: Callable | None = None):
    """Neumann series; returns ``(p, info)`` with ``p = alpha * sum_{j<=K} c_j`` and
    ``info['diverged']``.  With ``growth_tol`` each term's norm comes out of the
    same fused pass that updates it (``axpy_dot_``); ``keep_partial`` keeps the
    partial sum before the first bad term (``on_divergence='truncate'``).
    ``sync``: as in :func:`power_iteration` (the term norms and the finiteness check)."""
    c = V.clone(v)
    p = V.clone(v)
    norms = [float(_synced(sync, V.norm(c))[0])]
    diverged, reason = False, None
    good_p = None
    for j in range(K):
        h = matvec(c)
        if growth_tol is None and not keep_partial:
            V.neumann_step_(c, p, h, alpha)
            continue
        prev_p = V.clone(p) if keep_partial else None
        nc = max(float(_synced(sync, V.axpy_dot_(c, -alpha, h))[0]), 0.0) ** 0.5  # c <- c - alpha h, ||c||^2
        torch._foreach_add_(p, c)
        norms.append(nc)
        if not math.isfinite(nc):
            diverged, reason, good_p = True, f"non-finite term at j={j + 1}", prev_p
            break
        if growth_tol is not None and nc > norms[-2] * (1.0 + growth_tol) and nc > 1e-30:
            diverged = True
            reason = f"term norm grew from {norms[-2]:.3e} to {nc:.3e} at j={j + 1} (spectral radius of I - alpha H >= 1)"
            good_p = prev_p
            break
    if growth_tol is None and not keep_partial and not math.isfinite(float(_synced(sync, V.norm(p))[0])):
        diverged, reason = True, "non-finite result"
    if diverged:
        p = good_p if good_p is not None else p
    terms = len(norms) - 1 if (growth_tol is not None or keep_partial) else K
    return V.scale(p, alpha), {"diverged": diverged, "reason": reason, "term_norms": norms, "terms_used": terms}


def conjugate_gradient(matvec: Callable, v: list, max_iter: int, tol: float = 1e-10, sync: Callable | None = None):
    """``p ~= A^-1 v`` for the operator ``matvec`` (``sync``: as in :func:`power_iteration`,
    for ``<d, Ad>`` and ``<r, r>``)."""
    x = V.zeros_like(v)
    r = V.clone(v)
    d = V.clone(v)
    rr = _synced(sync, V.dot(r, r))[0]
    v_norm = max(float(rr), 0.0) ** 0.5
    info = {"iterations": 0, "negative_curvature": False, "residual": float(rr) ** 0.5}
    if v_norm == 0.0:
        return x, info
    for k in range(max_iter):
        hd = matvec(d)
        dhd = _synced(sync, V.dot(d, hd))[0]
        if not torch.isfinite(dhd) or float(dhd) <= 0.0:
            info["negative_curvature"] = True
            info["direction_curvature"] = float(dhd)
            break  # the last iterate (0 on the first direction: no curvature to scale a step by)
        a = rr / dhd
        r_new_dot = _synced(sync, V.cg_update_(x, r, d, hd, a))[0]  # x <- x + a d ; r <- r - a Hd ; <r, r>
        info["iterations"] = k + 1
        info["residual"] = float(r_new_dot) ** 0.5
        if float(r_new_dot) ** 0.5 <= tol * v_norm:
            break
        beta = r_new_dot / rr
        rr = r_new_dot
        d = V.add(r, V.scale(d, beta))
    return x, info


# --------------------------------------------------------------------------- validation


def _nonfinite_error(msg: str):
    from ..commentary.base import NonFiniteError  # the library's one error type for NaN/Inf in data or losses

    return NonFiniteError(msg)


def _check_grad_finite(op, what: str) -> None:
    """After a solver failure: a non-finite training gradient ``g_T`` is bad data, not divergence."""
    try:
        g = op.grad()
    except Exception:  # noqa: BLE001 - only a diagnosis
        return
    if not V.isfinite(g):
        raise _nonfinite_error(f"implicit_hypergradient: the training loss gradient g_T contains NaN or Inf "
                               f"({what}); check the training batch and the loss")


def _number(name: str, value, *, positive: bool = False, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value}")


def _count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_solver(solver) -> None:
    """Raise a clear error for a solver configuration that cannot work (``K`` negative,
    ``alpha`` zero/negative/NaN, negative damping ...)."""
    if isinstance(solver, NeumannConfig):
        _count("NeumannConfig.K", solver.K, 0)
        if solver.alpha is not None:  # +inf is left to the divergence checks
            _number("NeumannConfig.alpha", solver.alpha, positive=True, allow_inf=True)
        _number("NeumannConfig.damping", solver.damping)
        _number("NeumannConfig.alpha_scale", solver.alpha_scale, positive=True)
        _count("NeumannConfig.power_iters", solver.power_iters, 1)
        _count("NeumannConfig.power_iters_warm", solver.power_iters_warm, 1)
        _count("NeumannConfig.reestimate_every", solver.reestimate_every, 1)
        if solver.growth_tol is not None:
            _number("NeumannConfig.growth_tol", solver.growth_tol)
        if solver.on_divergence not in ("fallback", "raise", "truncate"):
            raise ValueError(f"on_divergence must be 'fallback', 'raise' or 'truncate', got {solver.on_divergence!r}")
    elif isinstance(solver, CGConfig):
        _count("CGConfig.max_iter", solver.max_iter, 1)
        _number("CGConfig.tol", solver.tol)
        _number("CGConfig.damping", solver.damping)
        if solver.on_divergence not in ("fallback", "raise"):
            raise ValueError(f"CGConfig.on_divergence must be 'fallback' or 'raise', got {solver.on_divergence!r}")
    else:
        raise TypeError(f"solver must be NeumannConfig or CGConfig, got {type(solver).__name__}")


def _check_state(name: str, d) -> dict:
    if not isinstance(d, Mapping):
        raise TypeError(f"implicit_hypergradient: {name} must be a dict of tensors, got {type(d).__name__}")
    for k, t in d.items():
        if not torch.is_tensor(t):
            raise TypeError(f"implicit_hypergradient: {name}[{k!r}] must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"implicit_hypergradient: {name}[{k!r}] must be floating point, got {t.dtype}")
    return dict(d)


# --------------------------------------------------------------------------- main entry


def _check_reduction(train_loss, reduce) -> None:
    """A WeightedLoss's reduction must be the one the reducer combines for: a "sum" loss
    combined as a mean (or the reverse) is off by the number of ranks, and "normalized"
    (sum w l / sum w) is not a combination of per-rank losses at all."""
    from .hvp import WeightedLoss

    want = getattr(reduce, "train_reduction", None)
    if isinstance(train_loss, WeightedLoss) and want is not None and train_loss.reduction != want:
        raise ValueError(f"implicit_hypergradient: train_loss reduces with {train_loss.reduction!r} but reduce "
                         f"combines the ranks' derivatives for {want!r}"
                         + (" (sum w l / sum w over the union is not a combination of per-rank losses: use 'mean' "
                            "or 'sum')" if train_loss.reduction == "normalized" else
                            f"; build the reducer with train_reduction={train_loss.reduction!r}"))


def _val_grads(val_loss, params, hparams, batch):
    th = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    ph = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad(), pool_rules():  # ATen's NCHW max-pool is slow on the CPU (engine/pooling.py)
        L = scalar_loss("val_loss", val_loss(th, ph, batch))
        if not L.requires_grad:
            raise ValueError("val_loss depends on neither params nor hparams (its value has no gradient), so "
                             "the hypergradient would be zero; was it computed under no_grad or from detached tensors?")
        gs = torch.autograd.grad(L, list(th.values()) + list(ph.values()), allow_unused=True)
    n = len(th)
    gt = [torch.zeros_like(t) if g is None else g for g, t in zip(gs[:n], th.values())]
    gp = [torch.zeros_like(t) if g is None else g for g, t in zip(gs[n:], ph.values())]
    return L.detach(), gt, gp


def inverse_hvp(op, v, solver, state: EngineState | None = None, info: dict | None = None, *, reduce=None):
    """``p ~= (H + delta I)^-1 v`` with the given solver (Neumann or CG) and operator ``op``.

    ``reduce`` (several processes, e.g. ``distributed.ShardReducer``): ``op``'s products
    are combined over the ranks (``op`` is wrapped in :class:`~.hvp.ReducedOperator`
    unless it is one) and every scalar that steers the solver is synchronised;
    ``v`` must already be the same on every rank.  The solver's damping adds to the
    operator's own (``make_operator(damping=...)``); ``op.damping`` is as given afterwards."""
    base = getattr(op, "damping", 0.0)  # a user operator may have none
    try:
        return _inverse_hvp(op, v, solver, state, info, reduce, base)
    finally:
        op.damping = base


def _inverse_hvp(op, v, solver, state, info, reduce, base):
    info = {} if info is None else info
    check_solver(solver)
    sync = None
    if reduce is not None:
        from .hvp import ReducedOperator

        op = op if isinstance(op, ReducedOperator) else ReducedOperator(op, reduce)
        sync = reduce.sync
    if isinstance(solver, CGConfig):
        op.damping = base + solver.damping
        p, cg = conjugate_gradient(op.matvec, v, solver.max_iter, solver.tol, sync=sync)
        info.update(solver="cg", **cg)
        if cg["negative_curvature"] and not math.isfinite(cg.get("direction_curvature", 0.0)):
            _check_grad_finite(op, "conjugate gradients met a non-finite curvature")
        if cg["negative_curvature"]:
            msg = (f"conjugate gradients met non-positive curvature ({cg.get('direction_curvature')}) after "
                   f"{cg['iterations']} iterations: the Hessian is indefinite here")
            hint = "Use damping or curvature='gauss_newton'."
            if solver.on_divergence == "raise":
                raise HypergradientDivergenceError(f"{msg}. {hint}")
            last = ("returning the last iterate" if cg["iterations"] else
                    "returning p = 0 (the last iterate: the hypergradient is the direct term alone)")
            warnings.warn(f"{msg}; {last}. {hint}", HypergradientDivergenceWarning, stacklevel=user_stacklevel())
        return p, info
    if not isinstance(solver, NeumannConfig):
        raise TypeError(f"solver must be NeumannConfig or CGConfig, got {type(solver).__name__}")
    if solver.on_divergence not in ("fallback", "raise", "truncate"):
        raise ValueError(f"on_divergence must be 'fallback', 'raise' or 'truncate', got {solver.on_divergence!r}")
    state = EngineState() if state is None else state
    op.damping = base + solver.damping
    alpha = solver.alpha
    if alpha is None:
        try:
            alpha = _auto_alpha(op, v, solver, state, info, sync)
        except HypergradientDivergenceError:
            _check_grad_finite(op, "power iteration failed")
            raise
    p, ninfo = neumann(op.matvec, v, solver.K, alpha, solver.growth_tol, keep_partial=solver.on_divergence == "truncate",
                       sync=sync)
    info.update(solver="neumann", alpha=alpha, damping=op.damping, **ninfo)
    if not ninfo["diverged"]:
        return p, info
    msg = f"Neumann series diverged with alpha={alpha:g}, damping={op.damping:g}: {ninfo['reason']}"
    if "non-finite" in (ninfo["reason"] or ""):
        _check_grad_finite(op, "the Neumann series met a non-finite term")
    if solver.on_divergence == "raise":
        raise HypergradientDivergenceError(msg)
    if solver.on_divergence == "truncate":
        warnings.warn(msg + f"; keeping {_kept(ninfo)}", HypergradientDivergenceWarning, stacklevel=user_stacklevel())
        return p, info
    # fallback: alpha from power iteration, then damping if indefinite
    lam, vec, used = power_iteration(op.matvec, v, solver.power_iters, sync=sync)
    state.lambda_max, state.eigvec, state.estimated_at = abs(lam), vec, state.calls
    info["power_iters"] = info.get("power_iters", 0) + used
    if not math.isfinite(lam) or lam == 0.0:
        raise HypergradientDivergenceError(msg + f"; power iteration gave lambda={lam}")
    lam_max = abs(lam)
    if lam < 0:  # dominant eigenvalue negative: find the top positive one by shifting
        lam_top, _, used2 = power_iteration(lambda c: V.add(op.matvec(c), c, alpha=lam_max), v, solver.power_iters,
                                            sync=sync)
        info["power_iters"] += used2
        lam_max = max(lam_top - lam_max, 1e-12)
    # smallest eigenvalue: power iteration on (lam_max I - H)
    lam_shift, _, used3 = power_iteration(lambda c: V.sub(V.scale(c, lam_max), op.matvec(c)), v, solver.power_iters,
                                          sync=sync)
    info["power_iters"] += used3
    lam_min = lam_max - lam_shift
    extra = 0.0
    if lam_min <= 0:
        extra = -lam_min + 1e-3 * lam_max
    op.damping = base + solver.damping + extra
    alpha2 = solver.alpha_scale / (lam_max + extra)
    warnings.warn(
        msg + f"; falling back to alpha={alpha2:.3g} from power iteration (lambda_max~{lam_max:.3g}, "
        f"lambda_min~{lam_min:.3g}) with damping {op.damping:.3g}",
        HypergradientDivergenceWarning,
        stacklevel=user_stacklevel(),
    )
    # A few power iterations underestimate |lambda_min| (a Rayleigh quotient approaches the
    # extreme eigenvalue from inside), so on a strongly indefinite minibatch Hessian the damped
    # series can still grow slowly: keep its partial sum up to the last non-growing term (as
    # 'truncate' does) rather than end the training run.
    p, ninfo = neumann(op.matvec, v, solver.K, alpha2, solver.growth_tol, keep_partial=True, sync=sync)
    info.update(fallback=True, alpha=alpha2, damping=op.damping, lambda_max=lam_max, lambda_min=lam_min, **ninfo)
    if ninfo["diverged"]:
        if "non-finite" in (ninfo["reason"] or ""):
            _check_grad_finite(op, "the damped Neumann series met a non-finite term")
        warnings.warn(f"Neumann series still grows after the fallback (alpha={alpha2:.3g}, damping={op.damping:.3g}): "
                      f"{ninfo['reason']}; keeping {_kept(ninfo)}",
                      HypergradientDivergenceWarning, stacklevel=user_stacklevel())
    return p, info


def _kept(ninfo) -> str:
    """What a truncated series keeps: p = alpha * (c_0 + ... + c_{n-1}), c_0 = v."""
    n = ninfo["terms_used"]
    return f"the partial sum of its first {n} term{'s' if n != 1 else ''} (v and {n - 1} product{'s' if n != 2 else ''})"


def _auto_alpha(op, v, solver, state, info, sync=None):
    due = state.lambda_max is None or (state.calls - state.estimated_at) >= solver.reestimate_every
    if due:
        warm = state.eigvec is not None
        iters = solver.power_iters_warm if warm else solver.power_iters
        lam, vec, used = power_iteration(op.matvec, v, iters, v0=state.eigvec, sync=sync)
        info["power_iters"] = used
        if not math.isfinite(lam) or lam == 0.0:
            raise HypergradientDivergenceError(f"power iteration failed (lambda={lam})")
        state.lambda_max, state.eigvec, state.estimated_at = abs(lam), vec, state.calls
    info["lambda_max"] = state.lambda_max
    return solver.alpha_scale / state.lambda_max


# training losses found deterministic, by linearize's key of a loss and the state it reads (a
# module switched to training mode is another key); a loss re-created with new captured objects
# every call is probed every call (pass the same callable: the linearised HVP needs that too)
_DETERMINISTIC: "OrderedDict[tuple, bool]" = OrderedDict()


def _check_deterministic(train_loss, params, hparams, batch) -> None:
    """Refuse a training loss that draws random numbers (Dropout in training mode ...): the
    engine evaluates it several times per call (the Hessian's graph or trace, the mixed term),
    and each evaluation would draw others, so the result would be the hypergradient of no one
    loss.  Two evaluations are compared once per loss and state (not the global generator's
    state, which other threads draw from too); a tolerance leaves GPU atomics' rounding alone."""
    from .linearize import _loss_key

    key, _ = _loss_key(train_loss)
    if key in _DETERMINISTIC:
        _DETERMINISTIC.move_to_end(key)
        return
    with torch.no_grad():
        a, b = (scalar_loss("train_loss", train_loss(params, hparams, batch)) for _ in range(2))
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=True):
        raise ValueError(
            f"implicit_hypergradient: train_loss gave {float(a):.6g} and then {float(b):.6g} at the same point: it "
            "draws random numbers (Dropout in training mode, a random augmentation ...). The implicit "
            "hypergradient needs one deterministic training loss: it is evaluated several times per call, and "
            "each evaluation would draw other numbers. Draw them outside and pass them in the batch, or switch "
            "such modules to eval mode for the call (engine.random_modules_eval(student) does this for Dropout, "
            "RReLU and MultiheadAttention, and CommentaryOptimizer and learn_ift use it; a module calling "
            "F.dropout itself needs its training flag off)")
    _DETERMINISTIC[key] = True
    if len(_DETERMINISTIC) > 256:
        _DETERMINISTIC.popitem(last=False)


def implicit_hypergradient(
    train_loss: Callable,
    val_loss: Callable,
    params: Mapping[str, torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    train_batch: Any = None,
    val_batch: Any = None,
    *,
    solver: NeumannConfig | CGConfig | None = None,
    curvature: str = "hessian",
    hvp: str = "auto",
    state: EngineState | None = None,
    v: list | None = None,
    linearize: bool = True,
    reduce: Any = None,
) -> HypergradResult:
    """IFT hypergradient ``dL_V/dphi`` at the student parameters ``params``.

    ``train_loss(params, hparams, train_batch)`` and ``val_loss(params, hparams,
    val_batch)`` are scalar losses over dicts of tensors.  Pass the same
    ``train_loss`` callable every hyper-step (the batch is an argument): the
    linearised forward-over-reverse HVP traces it once and reuses the trace.
    ``linearize=False`` uses eager ``torch.func.jvp`` for ``forward_over_reverse``.  Returns a
    :class:`HypergradResult`; ``result.grads[name]`` has the shape of
    ``hparams[name]``.

    Several processes (data parallel, each rank passing its shard of both batches):
    ``reduce`` combines each rank's derivatives into those of the union of the
    shards -- an object with ``val(tensors)`` (``v``, the direct term, the
    validation loss), ``train(tensors)`` (every Hessian-vector product and the
    mixed term) and ``sync(t)`` (the solvers' scalars), each returning the same
    on every rank; :class:`commentaries_ext.distributed.ShardReducer` is the
    ``torch.distributed`` one.  The result is then the same on every rank.  A
    given ``v`` is taken as already combined.
    """
    solver = NeumannConfig() if solver is None else solver
    check_solver(solver)
    if curvature not in ("hessian", "gauss_newton"):
        raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    state = EngineState() if state is None else state
    frozen = [k for k, t in _check_state("params", params).items() if not t.requires_grad]
    if frozen and len(frozen) < len(params):  # named_parameters() with frozen entries, say
        warnings.warn(f"implicit_hypergradient: params {frozen} do not require grad, yet every entry of params is "
                      "differentiated as a student parameter; leave frozen ones out (FunctionalModule.params() "
                      "does)", UserWarning, stacklevel=2)
    params = {k: t.detach() for k, t in params.items()}
    hparams = {k: t.detach() for k, t in _check_state("hparams", hparams).items()}
    if not params:
        raise ValueError("implicit_hypergradient: params is empty (no student parameters to differentiate)")
    if state.eigvec is not None and [t.shape for t in state.eigvec] != [t.shape for t in params.values()]:
        raise ValueError("implicit_hypergradient: state holds the power-iteration estimate of parameters shaped "
                         f"{[tuple(t.shape) for t in state.eigvec]}, not like params; use one EngineState per problem")
    if reduce is not None:
        _check_reduction(train_loss, reduce)
    # The K products allocate the same buffers again and again (commentaries_ext/memory.py).
    # Attention runs as plain math: the fused scaled-dot-product kernels have no double backward.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with reuse_cpu_memory(), sdpa_kernel([SDPBackend.MATH]):
        info: dict = {"curvature": curvature}
        if v is None:
            Lv, v, direct = _val_grads(val_loss, params, hparams, val_batch)
            if reduce is not None:  # one collective for v, the direct term and the loss
                red = reduce.val(list(v) + list(direct) + [Lv.reshape(1)])
                v, direct, Lv = red[:len(v)], red[len(v):len(v) + len(direct)], red[-1].reshape(())
            if not bool(torch.isfinite(Lv).all()) or not V.isfinite(v):
                raise _nonfinite_error(f"implicit_hypergradient: the validation loss ({float(Lv):g}) or its gradient "
                                       "contains NaN or Inf; check the validation batch")
        else:
            v = list(v)
            if len(v) != len(params) or any(not torch.is_tensor(a) or a.shape != b.shape
                                             for a, b in zip(v, params.values())):
                raise ValueError("implicit_hypergradient: v must be a list of tensors shaped like params "
                                 f"({[tuple(t.shape) for t in params.values()]})")
            Lv, direct = torch.tensor(float("nan")), [torch.zeros_like(t) for t in hparams.values()]
        expected = solver.K if isinstance(solver, NeumannConfig) and solver.alpha is not None else None
        _check_deterministic(train_loss, params, hparams, train_batch)
        # undamped: inverse_hvp adds the solver's damping (and any fallback's)
        op = make_operator(train_loss, params, hparams, train_batch, curvature=curvature, hvp=hvp, damping=0.0,
                           linearize=linearize, expected_products=expected)
        info["hvp"] = type(op).__name__
        if reduce is not None:
            from .hvp import ReducedOperator

            op = ReducedOperator(op, reduce)
        p, info = inverse_hvp(op, v, solver, state, info, reduce=reduce)
        state.calls += 1
        if curvature == "gauss_newton":
            from .hvp import DoubleBackwardHessian, ForwardOverReverseHessian  # noqa: F401
            mixed = op._mixed_double_backward(p)
        else:
            mixed = op.mixed(p)
        info["n_matvec"] = op.n_matvec
        grads = {name: d - m for name, d, m in zip(hparams, direct, mixed)}
        return HypergradResult(grads=grads, p=p, v=v, val_loss=Lv, info=info)
