"""Several processes: commentary learning under ``torch.distributed`` (data parallel).

Every rank holds the same student and commentary parameters and one *shard*
of every batch.  The hypergradient of the *union* of the shards is not the
mean of the ranks' own hypergradients -- the IFT formula is nonlinear in the
data (``mean_r H_r^-1 v_r != H^-1 v``) -- so what is combined across ranks is
every derivative of a loss, where the engine takes it:

* ``v = dL_V/dtheta``, the direct term and the validation loss (``reducer.val``);
* every Hessian-vector product ``H c`` -- power iteration, Neumann terms, CG --
  and the mixed term ``d(g_T . p)/dphi`` (``reducer.train``);
* every scalar that steers a solver (Rayleigh quotients, term norms, CG's
  ``<d, Hd>`` and ``<r, r>``, finiteness; ``reducer.sync``), so that all ranks
  take the same decisions (alpha, divergence and fallback, CG's stopping) and
  issue the same collectives, even where local kernels sum in another order.

The result is bit-identical on every rank, so a hyper-optimizer step keeps the
commentary parameters identical.  For backpropagation through training,
``engine.unroll(..., grad_reduce=reducer.train)`` combines each inner step's
student gradient with a *differentiable* all-reduce (its backward is the
adjoint all-reduce), so every rank follows the union's trajectory and the
mean over ranks of the commentary gradients after ``L_V.backward()`` is the
union's meta-gradient.

What "the union" is.  The training loss of a rank is its commentary loss on its
shard; the union's is the same loss on the concatenated shards:

* ``train_reduction="sum"`` (the paper's reference code): the sum of the
  ranks' losses -- derivatives are summed;
* ``"mean"`` (example weighting's default): ``sum_r n_r L_r / N`` -- derivatives
  are averaged with weights ``n_r / N`` (the plain mean when every shard has the
  same size; pass ``train_size=`` so that shards of different sizes are weighted
  right);
* ``"normalized"`` (``sum w l / sum w``) is not a combination of per-rank
  quantities (its mixed term needs the union's ``sum w``): refused.

The validation loss is a mean (weights ``m_r / M`` with ``val_size=``).
BatchNorm in training mode normalises with each shard's statistics (as
``DistributedDataParallel`` without ``SyncBatchNorm`` does): the result is then
exactly the hypergradient of the mean of the per-rank losses, which differs
from one process on the concatenated batch.  ``SyncBatchNorm`` inside the
engine's functional calls is not supported (its collectives have no double
backward).  Commentaries that draw randomness per batch (blending partners)
draw it per shard: partners are within a rank's shard.

Functions: :func:`enabled`, :func:`world_size`, :func:`rank`,
:func:`all_reduce_mean` (one flattened all-reduce per dtype),
:func:`broadcast_module_`, :func:`broadcast_buffers_`, :func:`broadcast_optimizer_state_`,
:func:`broadcast_int`, :func:`any_rank`, :func:`check_same`, :func:`check_same_settings`;
class :class:`ShardReducer`.
Collectives run on the tensors' device (gloo on CPU, NCCL on GPU); the
small bookkeeping tensors go on the group's device (CUDA for NCCL).
"""
from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import torch

TRAIN_REDUCTIONS = ("sum", "mean")


def _dist():
    import torch.distributed as dist

    return dist


def enabled(group=None) -> bool:
    """Whether ``torch.distributed`` is available and initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def use_distributed(distributed: bool | None) -> bool:
    """Whether a loop with the setting ``distributed`` (None: when a process group exists) runs
    across processes; ``True`` without an initialised process group raises (never a silent
    one-process run)."""
    if distributed and not enabled():
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return enabled() if distributed is None else bool(distributed)


def world_size(group=None) -> int:
    return _dist().get_world_size(group) if enabled() else 1


def rank(group=None) -> int:
    return _dist().get_rank(group) if enabled() else 0


def _group_device(group=None) -> torch.device:
    """Where the group's bookkeeping tensors live (NCCL: the current CUDA device)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _by_dtype(tensors: Sequence[torch.Tensor]) -> dict:
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _reduce_flat(tensors: Sequence[torch.Tensor], pre, post, group) -> list[torch.Tensor]:
    """``post * all_reduce_sum(pre * x)`` for a list, one flattened collective per dtype/device.
    ``pre``/``post`` are Python floats (this rank's coefficients).  New tensors."""
    dist = _dist()
    out: list = [None] * len(tensors)
    for _, idx in _by_dtype(tensors).items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        # a coefficient 0 is a rank with an empty shard: its values (a mean over no examples is
        # NaN) weigh nothing, and 0 * NaN would still poison the sum
        if pre == 0.0:
            flat.zero_()
        elif pre != 1.0:
            flat.mul_(pre)
        dist.all_reduce(flat, group=group)
        if post == 0.0:
            flat.zero_()
        elif post != 1.0:
            flat.mul_(post)
        off = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[off:off + n].view(tensors[i].shape)
            off += n
    return out


class _Combine(torch.autograd.Function):
    """``y = post * all_reduce_sum(pre * x)``; its adjoint is ``pre * all_reduce_sum(post * g)``
    (so it is differentiable to any order, every rank calling it in the same order)."""

    @staticmethod
    def forward(ctx, pre, post, group, *xs):
        ctx.pre, ctx.post, ctx.group = pre, post, group
        ctx.like = [(x.shape, x.dtype, x.device) for x in xs]
        return tuple(t.clone() for t in _reduce_flat(xs, pre, post, group))

    @staticmethod
    def backward(ctx, *gs):
        gs = [torch.zeros(s, dtype=d, device=dev) if g is None else g for g, (s, d, dev) in zip(gs, ctx.like)]
        return (None, None, None, *_combine(gs, ctx.post, ctx.pre, ctx.group))


def _combine(tensors, pre, post, group):
    tensors = list(tensors)
    if not tensors:
        return []
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return list(_Combine.apply(pre, post, group, *tensors))
    return _reduce_flat(tensors, pre, post, group)


def all_reduce_mean(tensors: Sequence[torch.Tensor], group=None, weight: float | None = None) -> list[torch.Tensor]:
    """The mean over ranks of each tensor (new tensors, one flattened all-reduce per
    dtype).  ``weight``: this rank's weight (e.g. its batch size) -- the result is
    ``sum_r weight_r x_r / sum_r weight_r`` (the total weight travels in the same
    collective).  Differentiable when the inputs require grad."""
    tensors = list(tensors)
    if not tensors or not enabled():
        return [t.clone() for t in tensors]
    if weight is None:
        return _combine(tensors, 1.0 / world_size(group), 1.0, group)
    w = torch.tensor([float(weight)], dtype=torch.float64, device=_group_device(group))
    _dist().all_reduce(w, group=group)
    return _combine(tensors, float(weight) / float(w), 1.0, group)


def _global_src(src: int, group) -> int:
    """``torch.distributed`` takes ``src`` as a global rank; these functions take the group's."""
    return src if group is None else _dist().get_global_rank(group, src)


def _coalesced_broadcast_(tensors: Sequence[torch.Tensor], src: int, group) -> None:
    dist = _dist()
    tensors = [t for t in tensors if t.numel()]
    for _, idx in _by_dtype(tensors).items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.broadcast(flat, src=_global_src(src, group), group=group)
        off = 0
        with torch.no_grad():
            for i in idx:
                n = tensors[i].numel()
                tensors[i].copy_(flat[off:off + n].view(tensors[i].shape))
                off += n


def broadcast_module_(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank (in place)."""
    if not enabled():
        return
    _coalesced_broadcast_(list(module.parameters()) + list(module.buffers()), src, group)


def broadcast_optimizer_state_(optimizer: torch.optim.Optimizer, src: int = 0, group=None) -> None:
    """Give every rank rank ``src``'s optimizer state and hyper-parameters
    (``load_state_dict`` of its state dict on the other ranks)."""
    if not enabled():
        return
    dist = _dist()
    obj = [optimizer.state_dict() if rank(group) == src else None]
    dev = _group_device(group)
    dist.broadcast_object_list(obj, src=_global_src(src, group), group=group, device=dev if dev.type == "cuda" else None)
    if rank(group) != src:
        optimizer.load_state_dict(obj[0])


def broadcast_int(value: int, src: int = 0, group=None) -> int:
    """Rank ``src``'s integer (e.g. a seed) on every rank."""
    if not enabled():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_group_device(group))
    _dist().broadcast(t, src=_global_src(src, group), group=group)
    return int(t.item())


def check_same(values: dict, group=None) -> None:
    """Raise ``ValueError`` (on every rank alike) unless each named number is the same
    on every rank -- settings that decide how many collectives a loop issues must
    agree, or the ranks wait for each other forever.  ``None`` counts as ``-1``."""
    if not enabled() or not values:
        return
    names = list(values)
    v = torch.tensor([float(-1 if values[k] is None else values[k]) for k in names], dtype=torch.float64,
                     device=_group_device(group))
    both = torch.cat([v, -v])
    _dist().all_reduce(both, op=_dist().ReduceOp.MAX, group=group)
    hi, lo = both[: len(names)], -both[len(names):]
    bad = [f"{k} (from {float(lo[i]):g} to {float(hi[i]):g})" for i, k in enumerate(names) if hi[i] != lo[i]]
    if bad:
        raise ValueError("these settings differ between the ranks: " + ", ".join(bad))


def check_same_settings(numbers: dict, texts: dict, group=None) -> None:
    """:func:`check_same` on ``numbers`` and on ``texts`` -- strings, solver configurations --
    by a crc32 of their ``repr`` (of their type's name for objects without a dataclass repr,
    whose default repr holds an address).  Every rank must pass the same names."""
    from dataclasses import is_dataclass

    def text(v):
        plain = v is None or isinstance(v, (str, int, float, bool, tuple, list, dict)) or is_dataclass(v)
        return repr(v) if plain else type(v).__qualname__

    check_same({**numbers, **{f"{k} (crc32)": zlib.crc32(text(v).encode()) for k, v in texts.items()}}, group)


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` is true on any rank (one 1-element all-reduce; the same answer on
    every rank, so that all take the same branch)."""
    if not enabled():
        return bool(flag)
    t = torch.tensor([float(flag)], device=_group_device(group))
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=group)
    return bool(t.item())


def broadcast_buffers_(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Give every rank rank ``src``'s buffers of ``module`` (in place; one broadcast per dtype).

    DistributedDataParallel's convention (``broadcast_buffers``): buffers such as BatchNorm
    running statistics are updated from each rank's shard and would drift apart; rank 0's
    are kept.  (Averaging would suit running means only, not integer counters or other
    buffers, and would still not give the union's running variance.)"""
    if not enabled():
        return
    _coalesced_broadcast_(list(module.buffers()), src, group)


class ShardReducer:
    """Combines one rank's derivatives into the union's (see the module docstring).

    ``train_reduction``: how the training loss reduces over examples (``"sum"`` or
    ``"mean"``; a commentary's ``reduction``, ``"mean"`` for blending and masks).
    ``train_size`` / ``val_size``: this rank's shard sizes; given, means are
    weighted by them (one small all-reduce here), else every shard is assumed
    to have the same size.  Methods, each one collective, the same on all ranks:

    * ``train(tensors)``: derivatives of the training loss (HVPs, mixed term,
      inner-step gradients; differentiable when the inputs require grad);
    * ``val(tensors)``: derivatives of the validation loss (and the loss);
    * ``sync(t)``: a tensor of scalars made identical on every rank (their mean).

    A rank whose shard is empty (a validation batch smaller than the world) weighs 0 and its
    values (NaN means) are dropped.  The first ``train``/``val`` call checks that every rank
    passes tensors of the same shapes and dtypes, and sizes must be given on all ranks or none;
    ``implicit_hypergradient`` checks a ``WeightedLoss``'s reduction against ``train_reduction``.

    This is the object ``engine.implicit_hypergradient(..., reduce=)``,
    ``engine.inverse_hvp(..., reduce=)`` and ``engine.unroll(..., grad_reduce=reducer.train)`` take.
    """

    def __init__(self, group=None, *, train_reduction: str = "mean", train_size: int | None = None,
                 val_size: int | None = None):
        if train_reduction not in TRAIN_REDUCTIONS:
            raise ValueError(
                f"train_reduction must be one of {TRAIN_REDUCTIONS} under torch.distributed, got {train_reduction!r}"
                + (" (sum(w l)/sum(w) over the union is not a combination of per-rank losses: "
                   "use reduction='mean' or 'sum')" if train_reduction == "normalized" else ""))
        if not enabled():
            raise RuntimeError("ShardReducer needs an initialised torch.distributed process group")
        self.group = group
        self.world = world_size(group)
        self.train_reduction = train_reduction
        self.train_coef = self.val_coef = 1.0 / self.world
        # always one all-reduce, with which sizes each rank gave: a size given on some ranks only
        # would otherwise pair this collective with another one of the other ranks
        sizes = (train_size, val_size)
        t = torch.tensor([float(0 if s is None else s) for s in sizes] + [float(s is not None) for s in sizes],
                         dtype=torch.float64, device=_group_device(group))
        _dist().all_reduce(t, group=group)
        totals = t.tolist()  # one host read (a sync on a GPU group)
        for i, name in enumerate(("train_size", "val_size")):
            if 0 < totals[2 + i] < self.world:
                raise ValueError(f"ShardReducer: {name} is given on {int(totals[2 + i])} of {self.world} ranks; give "
                                 "it on every rank or on none")
        if train_size is not None:
            self.train_coef = float(train_size) / totals[0]
        if val_size is not None:
            self.val_coef = float(val_size) / totals[1]
        if train_reduction == "sum":
            self.train_coef = 1.0
        self.train_size, self.val_size = train_size, val_size
        self._checked_kinds: set = set()

    def train(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        tensors = self._checked("train", tensors)
        return _combine(tensors, self.train_coef, 1.0, self.group)

    def val(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        tensors = self._checked("val", tensors)
        return _combine(tensors, self.val_coef, 1.0, self.group)

    def _checked(self, kind: str, tensors) -> list[torch.Tensor]:
        """On the first call of each kind: the ranks pass the same number of tensors with the same
        shapes and dtypes (else a flattened all-reduce mixes different layouts of equal size, or
        gloo aborts on a size mismatch); one small all-reduce."""
        tensors = list(tensors)
        if kind not in self._checked_kinds:
            self._checked_kinds.add(kind)
            layout = repr([(tuple(t.shape), str(t.dtype)) for t in tensors]).encode()
            check_same({f"{kind}: number of tensors": len(tensors),
                        f"{kind}: shapes and dtypes (crc32)": zlib.crc32(layout)}, self.group)
        return tensors

    def sync(self, t: torch.Tensor) -> torch.Tensor:
        return _reduce_flat([t], 1.0 / self.world, 1.0, self.group)[0]

    def __repr__(self) -> str:
        return (f"ShardReducer(world={self.world}, train_reduction={self.train_reduction!r}, "
                f"train_coef={self.train_coef:.6g}, val_coef={self.val_coef:.6g})")
