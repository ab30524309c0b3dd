"""Curvature operators: Hessian- (or Gauss-Newton-) vector products of a training
loss at fixed ``(theta, phi, batch)``, and the mixed term ``d(g_T . p)/d phi``.

``make_operator(loss, params, hparams, batch, curvature=..., hvp=..., damping=...)``
returns an object with

* ``grad()``        -- ``g_T = dL_T/dtheta`` (detached list);
* ``matvec(c)``     -- ``(H + delta I) c`` for a list ``c`` shaped like the params;
* ``mixed(p)``      -- ``d(g_T . p)/d phi`` as a list shaped like the hparams
                       (the IFT hypergradient is ``-mixed(p)``);
* ``n_matvec``      -- how many products were taken.

HVP modes (``hvp=``):

* ``"double_backward"``      -- ``g_T`` is computed once with ``create_graph=True``
  and each product is one backward through that graph (graph reused across
  the K terms; it also serves the mixed term).
* ``"forward_over_reverse"`` -- ``torch.func.jvp`` of ``torch.func.grad``;
  with ``linearize=True`` (default) the jvp graph is traced once per model
  and input shapes and split into a primal part (run once per operator) and a
  tangent part (run per product), so each further product costs only the
  tangent computation.  BatchNorm in training mode works because
  ``FunctionalModule`` never mutates running statistics during these calls.
* ``"auto"``                 -- ``forward_over_reverse`` (linearised) when the
  loss traces and more than ``AUTO_MIN_PRODUCTS`` products are expected, or
  fewer when the trace runs BatchNorm's forward-mode rules (``batchnorm.py``:
  decided once per loss, from its first trace); else ``double_backward``.

Curvature: ``"hessian"`` or ``"gauss_newton"`` (``J^T H_l J``, positive
semi-definite; needs a :class:`SplitLoss` so that the model output and the loss
head are known; the head's Hessian-vector product uses the cross-entropy
family's ``cross_entropy_hvp`` when the head declares it, else autograd).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch.func import grad as fgrad
from torch.func import jvp as fjvp

from .._stack import user_stacklevel
from . import vector as V
from .batchnorm import batch_norm_reverse_rules, batch_norm_rules
from .conv import conv_rules
from .pooling import pool_rules
from .rules import rules

_LINEARIZE_DEFAULT = True  # hvp='auto' -> linearised forward-over-reverse (see linearize.py)

AUTO_MIN_PRODUCTS = 2  # hvp="auto": double backward up to this many products (measured, BENCHMARKS.md)
_AUTO_BROKEN: set = set()  # losses whose trace failed: 'auto' uses double backward for them
# hvp="auto" with few products, per loss code (as _AUTO_BROKEN): whether its linearised trace runs
# BatchNorm's rules (then its primal pass plus products beat double backward even for one product;
# measured, BENCHMARKS.md). Per code, so that a loss re-created every call is probed once.
_FEW_PRODUCTS_LINEARIZED: dict = {}


def _code_of(loss):
    fn = getattr(loss, "__func__", loss)
    return getattr(fn, "__code__", id(loss))


LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Any], torch.Tensor]


# --------------------------------------------------------------------------- loss kinds


class WeightedLoss:
    """``L_T = reduce_i w_i(phi) * l_i(theta)`` (example weighting).

    ``per_example(params, batch) -> [N]`` losses (must not depend on phi);
    ``weights(hparams, batch) -> [N]`` commentary weights; ``reduction`` is
    ``"sum"`` (the reference code), ``"mean"`` (divide by N) or
    ``"normalized"`` (divide by ``sum(w)``).  Calling the object gives the
    scalar loss, so it is also a plain training loss; the engine additionally
    uses the fast mixed term: ``d_i = grad l_i . p`` in one forward-mode pass,
    then one backward through the commentary only.
    """

    def __init__(self, per_example: Callable, weights: Callable, reduction: str = "sum"):
        if reduction not in ("sum", "mean", "normalized"):
            raise ValueError(f"reduction must be 'sum', 'mean' or 'normalized', got {reduction!r}")
        self.per_example, self.weights, self.reduction = per_example, weights, reduction

    def reduce(self, w: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        s = (w * losses).sum()
        if self.reduction == "mean":
            return s / losses.numel()
        if self.reduction == "normalized":
            return s / w.sum()
        return s

    def __call__(self, params, hparams, batch):
        return self.reduce(self.weights(hparams, batch), self.per_example(params, batch))


class SplitLoss:
    """``L_T = head(outputs(params, hparams, batch), hparams, batch)``.

    Needed for the Gauss-Newton curvature.  ``head_hvp(z, u, hparams, batch)``
    (optional) returns ``d^2 head/dz^2 . u``; by default it is computed with
    autograd on the (small) output tensor.
    """

    def __init__(self, outputs: Callable, head: Callable, head_hvp: Callable | None = None):
        self.outputs, self.head, self.head_hvp = outputs, head, head_hvp

    def __call__(self, params, hparams, batch):
        return self.head(self.outputs(params, hparams, batch), hparams, batch)


# --------------------------------------------------------------------------- helpers


def scalar_loss(name: str, value) -> torch.Tensor:
    """A loss's value as a 0-dim tensor, or an error naming the loss (instead of autograd's or
    torch.func's about implicit gradients of non-scalars, floats not being iterable ...)."""
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor (one element), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got {value.dtype}")
    return value.reshape(())


def _leaves(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().requires_grad_(True) for k, v in d.items()}


def _zeros_if_none(gs, like):
    return [torch.zeros_like(l) if g is None else g for g, l in zip(gs, like)]


def _pack(names, values) -> dict[str, torch.Tensor]:
    return dict(zip(names, values))


@dataclass
class _Base:
    loss: Callable
    params: dict
    hparams: dict
    batch: Any
    damping: float = 0.0

    def __post_init__(self):
        self.pnames = list(self.params)
        self.hnames = list(self.hparams)
        self.n_matvec = 0
        self._grad = None

    def _damp(self, hc, c):
        if self.damping:
            torch._foreach_add_(hc, c, alpha=self.damping)
        return hc

    # mixed term, general path: reverse-over-reverse on a graph of g_T
    def _mixed_double_backward(self, p):
        if not self.hnames:
            return []
        if isinstance(self.loss, WeightedLoss):
            return _mixed_weighted(self.loss, self.params, self.hparams, self.batch, p, self.pnames)
        th = _leaves(self.params)
        ph = _leaves(self.hparams)
        with torch.enable_grad(), rules(pool_rules(), conv_rules(), batch_norm_reverse_rules()):
            L = self.loss(th, ph, self.batch)
            g = torch.autograd.grad(L, list(th.values()), create_graph=True, allow_unused=True)
            g = [gi for gi in g]
            pairs = [(gi, pi) for gi, pi in zip(g, p) if gi is not None and gi.requires_grad]
            if not pairs:
                return [torch.zeros_like(v) for v in ph.values()]
            out = torch.autograd.grad([a for a, _ in pairs], list(ph.values()), [b for _, b in pairs], allow_unused=True)
        return _zeros_if_none(out, list(ph.values()))

    def mixed(self, p):
        return self._mixed_double_backward(p)


def _mixed_weighted(loss: WeightedLoss, params, hparams, batch, p, pnames):
    """Example-weighting fast path: d_i = grad l_i . p by one jvp, one backward to phi."""
    th = {k: v.detach() for k, v in params.items()}
    tangent = {n: t.detach() for n, t in zip(pnames, p)}
    try:
        _, d = fjvp(lambda q: loss.per_example(q, batch), (th,), (tangent,))
    except NotImplementedError:  # an op without a forward-mode formula (MultiheadAttention's fast path ...)
        d = _jvp_by_double_vjp(lambda q: loss.per_example(q, batch), th, tangent)
    ph = _leaves(hparams)
    with torch.enable_grad():
        w = loss.weights(ph, batch)
        s = loss.reduce(w, d.detach())
        if loss.reduction == "normalized":  # d(sum w d / sum w)
            pass
        out = torch.autograd.grad(s, list(ph.values()), allow_unused=True)
    return _zeros_if_none(out, list(ph.values()))


def _jvp_by_double_vjp(f, th: dict, tangent: dict) -> torch.Tensor:
    """``J t`` of ``f`` at ``th`` by reverse mode only: ``d/du <J^T u, t>`` (J^T u is linear in u)."""
    leaves = _leaves(th)
    with torch.enable_grad():
        out = f(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, list(leaves.values()), u, create_graph=True, allow_unused=True)
        pairs = [(gi, tangent[k]) for gi, k in zip(g, leaves) if gi is not None and gi.requires_grad]
        if not pairs:
            return torch.zeros_like(out).detach()
        return torch.autograd.grad([a for a, _ in pairs], u, [b for _, b in pairs])[0]


class DoubleBackwardHessian(_Base):
    """``H c`` by backward through the graph of ``g_T`` (built once, reused)."""

    def __post_init__(self):
        super().__post_init__()
        self._th = _leaves(self.params)
        self._ph = _leaves(self.hparams)
        with torch.enable_grad(), rules(pool_rules(), conv_rules(), batch_norm_reverse_rules()):
            L = scalar_loss("train_loss", self.loss(self._th, self._ph, self.batch))
            if not L.requires_grad:
                raise ValueError("train_loss does not depend on params (its value has no gradient)")
            g = torch.autograd.grad(L, list(self._th.values()), create_graph=True, allow_unused=True)
        self._g = _zeros_if_none(g, list(self._th.values()))
        self._graph_ok = [gi.requires_grad for gi in self._g]
        self.loss_value = L.detach()

    def grad(self):
        return [g.detach() for g in self._g]

    def matvec(self, c):
        self.n_matvec += 1
        idx = [i for i, ok in enumerate(self._graph_ok) if ok]
        th = list(self._th.values())
        hc = torch.autograd.grad([self._g[i] for i in idx], th, [c[i] for i in idx], retain_graph=True, allow_unused=True)
        return self._damp(_zeros_if_none(list(hc), th), c)

    def mixed(self, p):
        if not self.hnames:
            return []
        if isinstance(self.loss, WeightedLoss):
            return _mixed_weighted(self.loss, self.params, self.hparams, self.batch, p, self.pnames)
        idx = [i for i, ok in enumerate(self._graph_ok) if ok]
        ph = list(self._ph.values())
        out = torch.autograd.grad([self._g[i] for i in idx], ph, [p[i] for i in idx], retain_graph=True, allow_unused=True)
        return _zeros_if_none(out, ph)


class ForwardOverReverseHessian(_Base):
    """``H c`` by ``jvp`` of ``grad`` (torch.func), optionally linearised once."""

    linearize: bool = True

    def __post_init__(self):
        super().__post_init__()
        th = {k: v.detach() for k, v in self.params.items()}
        ph = {k: v.detach() for k, v in self.hparams.items()}
        self._th, self._ph = th, ph
        batch = self.batch
        self._gfn = fgrad(lambda q: scalar_loss("train_loss", self.loss(q, ph, batch)))
        self._lin = None
        if self.linearize:
            try:
                from .linearize import linearized_hvp
            except ImportError:
                linearized_hvp = None
            if linearized_hvp is not None:
                self._lin = linearized_hvp(self.loss, th, ph, batch, auto=getattr(self, "auto", False))

    def grad(self):
        if self._lin is not None:
            return self._lin.grad()
        if self._grad is None:
            self._grad = list(self._gfn(self._th).values())
        return self._grad

    def matvec(self, c):
        self.n_matvec += 1
        if self._lin is not None:
            hc = self._lin.hvp(c)
        else:
            with batch_norm_rules():
                g, hc = fjvp(self._gfn, (self._th,), (_pack(self.pnames, [x.detach() for x in c]),))
            if self._grad is None:
                self._grad = list(g.values())
            hc = list(hc.values())
        return self._damp(hc, c)

    def mixed(self, p):
        if not self.hnames:
            return []
        if isinstance(self.loss, WeightedLoss):
            return _mixed_weighted(self.loss, self.params, self.hparams, self.batch, p, self.pnames)
        if self._lin is not None and self._lin.has_mixed:
            return self._lin.mixed(p)
        # forward-over-reverse: d/deps grad_phi L(theta + eps p, phi).  (Reverse-over-forward --
        # backward through a jvp -- gives wrong results through BatchNorm in training mode.)
        ph = {k: v.detach() for k, v in self.hparams.items()}
        tangent = _pack(self.pnames, [x.detach() for x in p])
        batch = self.batch
        gphi = lambda q: fgrad(lambda h: scalar_loss("train_loss", self.loss(q, h, batch)))(ph)  # noqa: E731
        with batch_norm_rules():
            _, m = fjvp(gphi, (self._th,), (tangent,))
        return [m[k] for k in self.hnames]


class GaussNewton(_Base):
    """``(J^T H_l J + delta I) c`` for a :class:`SplitLoss` (graph of the outputs reused)."""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.loss, SplitLoss):
            raise TypeError("curvature='gauss_newton' needs the training loss as a SplitLoss(outputs, head)")
        self._th = _leaves(self.params)
        ph = {k: v.detach() for k, v in self.hparams.items()}
        self._phd = ph
        with torch.enable_grad():
            z = self.loss.outputs(self._th, ph, self.batch)
            self._z = z
            zl = z.detach().requires_grad_(True)
            h = self.loss.head(zl, ph, self.batch)
            gz = torch.autograd.grad(h, zl, create_graph=self.loss.head_hvp is None)[0]
            self._zl, self._gz = zl, gz
            # J^T u as a function of u, with a graph in u so that J c = d/du <J^T u, c>
            self._u = torch.zeros_like(z, requires_grad=True)
            jtu = torch.autograd.grad(z, list(self._th.values()), self._u, create_graph=True, allow_unused=True)
            self._jtu = jtu
            g = torch.autograd.grad(z, list(self._th.values()), gz.detach(), retain_graph=True, allow_unused=True)
        self._grad = _zeros_if_none(list(g), list(self._th.values()))

    def grad(self):
        return self._grad

    def _head_hvp(self, u):
        if self.loss.head_hvp is not None:
            return self.loss.head_hvp(self._z.detach(), u, self._phd, self.batch)
        return torch.autograd.grad(self._gz, self._zl, u, retain_graph=True)[0]

    def matvec(self, c):
        self.n_matvec += 1
        th = list(self._th.values())
        idx = [i for i, t in enumerate(self._jtu) if t is not None and t.requires_grad]
        jc = torch.autograd.grad([self._jtu[i] for i in idx], self._u, [c[i] for i in idx], retain_graph=True)[0]
        u = self._head_hvp(jc.detach())
        out = torch.autograd.grad(self._z, th, u, retain_graph=True, allow_unused=True)
        return self._damp(_zeros_if_none(list(out), th), c)


def make_operator(
    loss: Callable,
    params: Mapping[str, torch.Tensor],
    hparams: Mapping[str, torch.Tensor],
    batch: Any,
    *,
    curvature: str = "hessian",
    hvp: str = "auto",
    damping: float = 0.0,
    linearize: bool = True,
    expected_products: int | None = None,
):
    """The curvature operator; ``expected_products`` (how many ``matvec`` calls will
    follow, if known) lets ``hvp="auto"`` pick double backward for one or two
    products, where building its graph (~one gradient) is cheaper than the
    linearised primal pass (~two gradients), unless the student has BatchNorm in
    training mode (its forward-mode rules make the linearised products ~0.5x a
    double-backward one), and the linearised forward-over-reverse HVP otherwise."""
    params, hparams = dict(params), dict(hparams)
    if curvature == "gauss_newton":
        return GaussNewton(loss, params, hparams, batch, damping)
    if curvature != "hessian":
        raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    if hvp not in ("double_backward", "forward_over_reverse", "auto"):
        raise ValueError(f"hvp must be 'double_backward', 'forward_over_reverse' or 'auto', got {hvp!r}")
    requested = hvp
    probe = False  # few products and not yet known whether the trace uses BatchNorm's rules
    if hvp == "auto":
        ok = linearize and _LINEARIZE_DEFAULT and _code_of(loss) not in _AUTO_BROKEN
        if ok and expected_products is not None and expected_products <= AUTO_MIN_PRODUCTS:
            known = _FEW_PRODUCTS_LINEARIZED.get(_code_of(loss))
            probe = known is None
            ok = probe or known
        hvp = "forward_over_reverse" if ok else "double_backward"
    if hvp == "double_backward":
        return DoubleBackwardHessian(loss, params, hparams, batch, damping)
    try:
        op = ForwardOverReverseHessian.__new__(ForwardOverReverseHessian)
        op.linearize = linearize
        op.auto = requested == "auto"
        op.__init__(loss, params, hparams, batch, damping)
        if probe:  # decided once per loss: the trace (cached) says whether BatchNorm's rules ran
            uses = op._lin is not None and op._lin.t.uses_batch_norm_rules
            _FEW_PRODUCTS_LINEARIZED[_code_of(loss)] = uses
            if not uses:
                return DoubleBackwardHessian(loss, params, hparams, batch, damping)
        return op
    except Exception as exc:  # untraceable loss, an op without a forward-mode formula ...
        if requested == "forward_over_reverse":
            raise
        from .linearize import TooManyTraces

        if not isinstance(exc, TooManyTraces):
            _AUTO_BROKEN.add(_code_of(loss))
        if probe:
            _FEW_PRODUCTS_LINEARIZED[_code_of(loss)] = False
        warnings.warn(f"forward-over-reverse HVP unavailable ({type(exc).__name__}: {exc}); using double backward",
                      stacklevel=user_stacklevel())
        return DoubleBackwardHessian(loss, params, hparams, batch, damping)


class ReducedOperator:
    """A curvature operator whose products are combined over several processes.

    ``reduce.train(tensors)`` (e.g. :class:`commentaries_ext.distributed.ShardReducer`)
    turns one rank's derivatives of its shard's training loss into the union's;
    ``matvec(c)`` is ``reduce.train(H_r c) + delta c`` (the damping is added once,
    after the combination), ``mixed(p)`` is ``reduce.train(mixed_r(p))``; one
    collective each.  ``c`` and ``p`` should be the same on every rank."""

    def __init__(self, op, reduce):
        self.op, self.reduce = op, reduce
        self.damping = op.damping

    @property
    def n_matvec(self):
        return self.op.n_matvec

    def grad(self):
        return self.reduce.train(self.op.grad())

    def matvec(self, c):
        self.op.damping = 0.0
        hc = self.reduce.train(list(self.op.matvec(c)))
        if self.damping:
            torch._foreach_add_(hc, list(c), alpha=self.damping)
        return hc

    def mixed(self, p):
        return self.reduce.train(list(self.op.mixed(p)))

    def _mixed_double_backward(self, p):
        return self.reduce.train(list(self.op._mixed_double_backward(p)))
