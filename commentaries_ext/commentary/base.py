"""What every commentary module shares.

A commentary is an ``nn.Module`` with one job: turn a training batch into the
ingredients of the student's training loss.  The protocol, the same for every
module and for both learning algorithms (BPTT and IFT):

    batch = commentary.prepare(x, y, index=idx, progress=i / T)   # validates, draws randomness
    prep  = commentary(batch)                                     # Prepared (depends on phi)
    loss  = commentary_loss(student(prep.x), prep)                # scalar

``prepare`` draws everything random (blending partners, mixup coefficients)
*once*, so that the loss is a deterministic function of ``(theta, phi, batch)``
-- the hypergradient engine evaluates it several times per hyper-step.
``forward`` is differentiable in the commentary's parameters, so
``torch.func.functional_call(commentary, phi, (batch,))`` gives the loss as a
function of explicit parameters ``phi`` (see :func:`train_loss_fn`).

Validation batches are never modified: :func:`validation_loss` is the plain
mean cross-entropy.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

REDUCTIONS = ("sum", "mean", "normalized")


class BatchError(ValueError):
    """A batch that cannot be used (shape, dtype, label range, empty)."""


class NonFiniteError(FloatingPointError):
    """NaN or Inf in the data or in a loss (``nan_policy='raise'``)."""


@dataclass
class Prepared:
    """The training loss's ingredients for one batch.

    ``x``: what the student sees (possibly blended or masked); ``target``: labels;
    ``weight``: per-example weights ``[N]`` or None; ``target_b``/``lam``: the
    second target and the coefficient of the first (blending);
    ``reduction``: ``"sum"``, ``"mean"`` or ``"normalized"`` (``sum(w l) / sum(w)``).
    ``extras``: module-specific tensors for plots and diagnostics (e.g. the mask).
    """

    x: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    target_b: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    reduction: str = "mean"
    extras: dict | None = None


# --------------------------------------------------------------------------- fused ops switch

_FUSED_BLEND = contextvars.ContextVar("commentaries_ext_fused_blend", default=True)
_FUSED_CE = contextvars.ContextVar("commentaries_ext_fused_ce", default=True)


@contextlib.contextmanager
def plain_ops():
    """Plain PyTorch for the blend and the cross-entropy inside this context
    (the hypergradient engine's losses and the BPTT unroll: forward-mode
    derivatives, tracing and higher-order gradients need no kernel support)."""
    t1, t2 = _FUSED_BLEND.set(False), _FUSED_CE.set(False)
    try:
        yield
    finally:
        _FUSED_CE.reset(t2)
        _FUSED_BLEND.reset(t1)


@contextlib.contextmanager
def plain_blend():
    """Blend with plain PyTorch ops inside this context (the hypergradient engine's
    losses: the fused op has no forward-mode rule and validates on the data, which
    the engine's traced forward-over-reverse HVP cannot go through; the blend does not
    depend on the student, so its Hessian-vector products lose nothing)."""
    token = _FUSED_BLEND.set(False)
    try:
        yield
    finally:
        _FUSED_BLEND.reset(token)


def snapshot_buffers(*modules) -> list:
    """Copies of the modules' buffers (BatchNorm running statistics), for :func:`restore_buffers`."""
    return [b.detach().clone() for m in modules for b in m.buffers()]


def restore_buffers(saved: list, *modules) -> None:
    """Put back the buffers :func:`snapshot_buffers` copied from the same modules."""
    with torch.no_grad():
        for b, s in zip((b for m in modules for b in m.buffers()), saved):
            b.copy_(s)


@contextlib.contextmanager
def kept_buffers(*modules):
    """Run the modules (training mode included) and leave their buffers -- BatchNorm running
    statistics -- as they were: for looking at what a commentary does without changing it, or
    for a pass that runs a forward a second time."""
    saved = snapshot_buffers(*modules)
    try:
        yield
    finally:
        restore_buffers(saved, *modules)


def fused_blend_enabled() -> bool:
    return _FUSED_BLEND.get()


# --------------------------------------------------------------------------- validation


def check_batch(x: Any, y: Any, num_classes: int | None = None, *, name: str = "batch",
                index: Any = None, num_examples: int | None = None, check_finite: bool = False) -> None:
    """Raise :class:`BatchError` naming what is wrong with ``(x, y[, index])``."""
    if not torch.is_tensor(x):
        raise BatchError(f"{name}: x must be a tensor, got {type(x).__name__}")
    if not torch.is_tensor(y):
        raise BatchError(f"{name}: y must be a tensor of class indices, got {type(y).__name__}")
    if x.dim() < 2:
        raise BatchError(f"{name}: x must have a batch dimension and features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise BatchError(f"{name}: x must be floating point, got {x.dtype}")
    n = x.shape[0]
    if n == 0:
        raise BatchError(f"{name}: empty batch (x has shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise BatchError(f"{name}: x has no features (shape {tuple(x.shape)})")
    if x.device.type == "meta":
        raise BatchError(f"{name}: x is on the meta device (no data)")
    if y.device != x.device:
        raise BatchError(f"{name}: y is on {y.device} but x is on {x.device}")
    if y.dim() != 1 or y.shape[0] != n:
        raise BatchError(f"{name}: y must have shape [{n}] to match x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype not in _INDEX_DTYPES:
        raise BatchError(f"{name}: y must hold integer class indices, got {y.dtype}")
    if num_classes is not None:
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise BatchError(f"{name}: label {bad} out of range [0, {num_classes}) (num_classes={num_classes})")
    if index is not None:
        if not torch.is_tensor(index) or index.dim() != 1 or index.shape[0] != n:
            raise BatchError(f"{name}: index must be an integer tensor of shape [{n}]")
        if index.dtype not in _INDEX_DTYPES:
            raise BatchError(f"{name}: index must hold integer example indices, got {index.dtype}")
        if index.device != x.device:
            raise BatchError(f"{name}: index is on {index.device} but x is on {x.device}")
        if num_examples is not None:
            lo, hi = (int(v) for v in torch.aminmax(index))
            if lo < 0 or hi >= num_examples:
                bad = lo if lo < 0 else hi
                raise BatchError(f"{name}: example index out of range [0, {num_examples}) (index holds {bad})")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{name}: x contains NaN or Inf")


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_logit_width(commentary: "Commentary", logits: torch.Tensor, who: str) -> None:
    """A commentary made for ``num_classes`` classes needs a student with that many logits (a
    10-class blending matrix or label-conditioned weights would be read at the wrong classes)."""
    k = getattr(commentary, "num_classes", None)
    if k is not None and logits.dim() == 2 and logits.shape[1] != k:
        raise BatchError(f"{type(commentary).__name__} was made for {k} classes but {who} outputs "
                         f"{logits.shape[1]} logits per example")


def check_param_dtype(who: str, x: torch.Tensor, param: torch.Tensor) -> None:
    """A network commentary's input must have its parameters' dtype (outside autocast)."""
    if x.dtype != param.dtype and param.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
        raise BatchError(f"{who}: x has dtype {x.dtype} but the network's parameters are {param.dtype}; cast the "
                         "batch (or the commentary) first")


def draw_device(generator: torch.Generator | None) -> torch.device:
    """Where random draws with ``generator`` happen: its own device (a CUDA generator draws on
    its GPU), the CPU without one. The draws are then moved to the batch's device."""
    return generator.device if generator is not None else torch.device("cpu")


def is_finite_batch(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


# --------------------------------------------------------------------------- losses


_CE_STATE: dict = {}


def _ops():
    """The fused cross-entropy ops module, once it imports and passes a tiny
    self-check against plain PyTorch (values and gradients); else None."""
    if not _FUSED_CE.get():
        return None
    if "mod" in _CE_STATE:
        return _CE_STATE["mod"]
    try:
        from ..ops import cross_entropy as ce  # type: ignore[attr-defined]
    except Exception:  # not built / not written yet
        _CE_STATE["mod"] = None
        return None
    from .. import backend

    try:
        _self_check(ce)
    except Exception as e:  # noqa: BLE001
        import warnings

        # a forced backend that cannot run here (an invalid COMMENTARIES_EXT_BACKEND raises in
        # forced()) is that block's problem: not remembered past it
        forced = backend.forced()
        warnings.warn(f"fused cross-entropy ops disabled for commentary losses ({type(e).__name__}: {e}); "
                      f"using plain PyTorch{f' while backend {forced!r} is forced' if forced else ''}",
                      RuntimeWarning, stacklevel=3)
        if forced is not None:
            return None
        _CE_STATE["mod"] = None
        return None
    _CE_STATE["mod"] = ce
    return ce


def _self_check(ce) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a, b = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([2, 2, 0, 1, 3])
    w = torch.rand(5, generator=g, dtype=torch.float64)
    lam = 0.5 + 0.5 * torch.rand(5, generator=g, dtype=torch.float64)
    for fused, plain in (
        (lambda z, w: ce.weighted_cross_entropy(z, a, w, reduction="sum"), lambda z, w: (w * _plain_ce(z, a)).sum()),
        (lambda z, l: ce.blended_cross_entropy(z, a, b, l, reduction="mean"), lambda z, l: _plain_ce(z, a, b, l).mean()),
    ):
        for second in (w, lam):
            zf, sf = z.clone().requires_grad_(), second.clone().requires_grad_()
            zp, sp = z.clone().requires_grad_(), second.clone().requires_grad_()
            lf, lp = fused(zf, sf), plain(zp, sp)
            gf, gp = torch.autograd.grad(lf, [zf, sf]), torch.autograd.grad(lp, [zp, sp])
            torch.testing.assert_close(lf, lp)
            torch.testing.assert_close(gf[0], gp[0])
            torch.testing.assert_close(gf[1], gp[1])


def per_example_ce(logits: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor | None = None,
                   lam: torch.Tensor | None = None) -> torch.Tensor:
    """Unweighted per-example (blended) cross-entropy ``[N]`` in float32 or float64
    (plain PyTorch: the engine takes forward-mode derivatives and traces it)."""
    logits = _float_logits(logits)
    return _plain_ce(logits, target.long(), target_b, lam)


def _plain_ce(logits, target, target_b=None, lam=None):
    logp = torch.log_softmax(logits, dim=-1)
    l_a = -logp.gather(1, target[:, None]).squeeze(1)
    if target_b is None:
        return l_a
    l_b = -logp.gather(1, target_b.long()[:, None]).squeeze(1)
    lam = lam.to(l_a.dtype)
    return lam * l_a + (1 - lam) * l_b


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(logits):
        raise BatchError(f"the student must return a logits tensor [N, C], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise BatchError(f"the student must return logits [N, C], got shape {tuple(logits.shape)}")
    if not (logits.is_floating_point()):
        raise BatchError(f"the student must return floating-point logits, got {logits.dtype}")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # AMP: the loss in float32
    return logits


def reduce_loss(losses: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is None:
        return losses.sum() if reduction == "sum" else losses.mean()
    weight = weight.to(losses.dtype)
    s = (weight * losses).sum()
    if reduction == "mean":
        return s / losses.numel()
    if reduction == "normalized":
        return s / weight.sum().clamp_min(torch.finfo(s.dtype).tiny)
    return s


def commentary_loss(logits: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """The student's training loss from its logits on ``prep.x`` and the ingredients.

    Runs the fused weighted / blended cross-entropy kernels when they are
    available (outside :func:`plain_ops`), else plain PyTorch."""
    logits = _float_logits(logits)
    n, c = logits.shape
    if prep.target.shape != (n,):
        raise BatchError(f"commentary_loss: logits has {n} rows but the batch has targets of shape "
                         f"{tuple(prep.target.shape)}")
    if _FUSED_CE.get() and n and not torch.compiler.is_compiling():  # eager student step (not the engine's traces)
        for what, t in (("label", prep.target), ("partner label", prep.target_b)):
            if t is not None:
                lo, hi = (int(v) for v in torch.aminmax(t))
                if lo < 0 or hi >= c:
                    raise BatchError(f"commentary_loss: {what} {lo if lo < 0 else hi} out of range for logits "
                                     f"with {c} classes (does the student output num_classes logits?)")
    ce = _ops() if (prep.weight is not None or prep.target_b is not None) else None
    if ce is not None:
        target = prep.target.long()
        if prep.target_b is None:
            w = prep.weight.to(logits.dtype)
            s = ce.weighted_cross_entropy(logits, target, w, reduction="sum")
            if prep.reduction == "mean":
                return s / logits.shape[0]
            if prep.reduction == "normalized":
                return s / w.sum().clamp_min(torch.finfo(s.dtype).tiny)
            return s
        if prep.weight is None and prep.reduction == "mean":
            return ce.blended_cross_entropy(logits, target, prep.target_b.long(), prep.lam.to(logits.dtype),
                                            reduction="mean")
    losses = per_example_ce(logits, prep.target, prep.target_b, prep.lam)
    return reduce_loss(losses, prep.weight, prep.reduction)


def validation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain mean cross-entropy (validation batches are never blended or weighted)."""
    return per_example_ce(logits, y).mean()


# --------------------------------------------------------------------------- the module base


class Commentary(nn.Module):
    """Base class.  Subclasses set ``kind`` and implement ``forward(batch) -> Prepared``
    and ``config() -> dict`` (JSON constructor arguments, for commentary files)."""

    kind: str = ""
    needs_index: bool = False

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.num_classes = None if num_classes is None else int(num_classes)

    # -- batches
    def prepare(self, x: torch.Tensor, y: torch.Tensor, *, index: torch.Tensor | None = None,
                progress: float | torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        """Validate and package a training batch (and draw its randomness)."""
        check_batch(x, y, self.num_classes, index=index, num_examples=getattr(self, "num_examples", None))
        if self.needs_index and index is None:
            raise BatchError(f"{type(self).__name__} needs the example indices: pass index=")
        batch = {"x": x, "y": y.long()}
        if index is not None:
            batch["index"] = index.long()
        batch["progress"] = _progress(progress, x)
        self._draw(batch, generator)
        return batch

    def _draw(self, batch: dict, generator: torch.Generator | None) -> None:
        """Draw the batch's randomness into ``batch`` (default: none)."""

    def forward(self, batch: dict) -> Prepared:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- convenience
    def training_loss(self, model: Callable[[torch.Tensor], torch.Tensor], batch: dict) -> torch.Tensor:
        prep = self(batch)
        return commentary_loss(model(prep.x), prep)

    def input_mismatch(self, shape) -> str | None:
        """Why the commentary's own network cannot take examples of ``shape`` (``x.shape[1:]``),
        or None (it can, or it does not look at ``x``). Checked when a file is loaded for data."""
        return None

    def hparams(self) -> dict[str, torch.Tensor]:
        """The trainable parameters ``phi`` as a dict (detached)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def plot(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, **kwargs):  # pragma: no cover
        """A matplotlib figure of what the commentary learned.

        One call for every type: ``plot(x_val[:256], y_val[:256])``. ``x, y`` are a batch of
        examples and labels; each type uses what it needs and ignores the rest:
        ExampleWeighting both (the weights of these examples), AttentionMask ``x`` (the
        masks of its first ``max_images``), Blending neither (its class-pair matrix;
        ``class_names=``), TabularWeighting neither (its weights belong to training
        examples by index; ``labels=`` the labels of all training examples, in order,
        for the per-class panel). Other keywords go to the plot function."""
        raise NotImplementedError


def _progress(progress, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if progress is None:
        return torch.zeros(n, dtype=x.dtype, device=x.device)
    if torch.is_tensor(progress):
        if progress.is_complex() or progress.dtype == torch.bool:
            raise BatchError(f"progress must be a real number or tensor, got dtype {progress.dtype}")
        if progress.device != x.device and progress.numel() != 1:
            raise BatchError(f"progress is on {progress.device} but x is on {x.device}")
    elif isinstance(progress, (str, bytes, complex, dict)):
        raise BatchError(f"progress must be a number or a tensor of shape [{n}], got {type(progress).__name__}")
    try:
        t = torch.as_tensor(progress)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BatchError(f"progress must be a number or a tensor of shape [{n}], got {type(progress).__name__} "
                         f"({e})") from None
    if t.is_complex():
        raise BatchError(f"progress must be real, got dtype {t.dtype}")
    t = t.to(dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise BatchError(f"progress must be a number or a tensor of shape [{n}], got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise BatchError("progress (i/T) must be finite")
    return t


# --------------------------------------------------------------------------- engine-facing losses


def call_commentary(commentary: Commentary, hparams: Mapping[str, torch.Tensor] | None, batch: dict,
                    *, pure: bool = False) -> Prepared:
    """``commentary(batch)`` with parameters ``hparams`` (None: its own).

    ``pure=True``: buffers (e.g. the teacher's BatchNorm running statistics) are
    replaced by fresh copies, so the call has no side effects -- the engine
    evaluates a loss many times per hyper-step, some of them inside
    ``torch.func`` transforms, which refuse in-place updates of captured tensors.
    """
    state = {} if hparams is None else dict(hparams)
    if pure:
        state.update({n: b.clone() for n, b in commentary.named_buffers()})
    if not state:
        return commentary(batch)
    return functional_call(commentary, state, (batch,), strict=False)


def train_loss_fn(commentary: Commentary, student: Callable, *, split: bool = False) -> Callable:
    """``L_T(params, hparams, batch)`` for the hypergradient engine.

    ``student(params, x) -> logits`` (e.g. an ``engine.functional.FunctionalModule``).
    Example weighting gives an ``engine.hvp.WeightedLoss`` (so the engine can use
    its fast mixed term); the other commentaries a plain callable. ``split=True`` (for
    ``curvature="gauss_newton"``): an ``engine.hvp.SplitLoss`` of the student's logits and
    the commentary's loss on them (the commentary is evaluated in both parts).
    """
    if split:
        from ..engine.hvp import SplitLoss

        def prepared(hparams, batch):
            with plain_ops():
                return call_commentary(commentary, hparams, batch, pure=True)

        def outputs(params, hparams, batch):
            x = prepared(hparams, batch).x if commentary.kind != "example_weighting" else batch["x"]
            return student(params, x)

        def head(logits, hparams, batch):
            with plain_ops():
                return commentary_loss(logits, prepared(hparams, batch))

        return SplitLoss(outputs, head)
    if commentary.kind == "example_weighting":
        try:
            from ..engine.hvp import WeightedLoss
        except Exception:  # engine not importable: a plain callable works too
            WeightedLoss = None

        def per_example(params, batch):
            return per_example_ce(student(params, batch["x"]), batch["y"])

        def weights(hparams, batch):
            with plain_ops():
                return call_commentary(commentary, hparams, batch, pure=True).weight

        if WeightedLoss is not None:
            return WeightedLoss(per_example, weights, commentary.reduction)

        def loss(params, hparams, batch):
            return reduce_loss(per_example(params, batch), weights(hparams, batch), commentary.reduction)

        return loss

    def loss(params, hparams, batch):
        with plain_ops():
            prep = call_commentary(commentary, hparams, batch, pure=True)
            return commentary_loss(student(params, prep.x), prep)

    return loss


def val_loss_fn(student: Callable) -> Callable:
    """``L_V(params, hparams, batch)``: plain mean cross-entropy on ``(x, y)``."""

    def loss(params, hparams, batch):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
        return validation_loss(student(params, x), y)

    return loss


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if torch.is_tensor(t) else math.isfinite(t)
