"""Fused solver updates over parameter-shaped vectors (DESIGN.md 4.3).

A vector is a list of tensors (one per parameter) or one flat buffer; the ops
run over every element of every tensor in one pass, without concatenating
(multi-tensor apply on the GPU, a parallel loop over tensors and chunks on
the CPU).  Scalars may be Python numbers or 0-dim tensors (no host
synchronisation); results are 0-dim tensors.  Not differentiable (the solvers
run on detached buffers).

Public functions
----------------
``neumann_step_(c, p, h, alpha)``   ``c <- c - alpha*h ; p <- p + c``   (in place)
``axpy_dot_(y, a, x, z=None)``      ``y <- y + a*x``; returns ``<y, z>`` (``z`` None or ``y``: ``<y, y>``)
``cg_update_(x, r, d, q, a)``       ``x <- x + a*d ; r <- r - a*q``; returns ``<r, r>``
``dot(x, y)``                       ``sum_i <x_i, y_i>``
``norm(x)``                         ``sqrt(dot(x, x))``

Kernel ops (same signature in every backend: ``reference``, ``cpp``,
``triton``, ``cuda``)
-----------------------------------------------------------------------
Validated input (the public functions guarantee it): non-empty lists of the
same length; tensor ``i`` of every list has the same shape; every tensor is
contiguous, on one device, of one dtype (float32/float64; bfloat16/float16 on
the GPU with float32 math); mutated lists do not alias the other lists (``z``
of ``axpy_dot`` is the empty list instead of aliasing ``y``).  Scalars ``alpha``/``a``
are 0-dim tensors on the data's device of the *accumulation dtype* (float64
for float64 data, else float32).  Returned dot products are 0-dim tensors of the
accumulation dtype (summed in at least float32 per block; blocks combined in
float64 on the CPU).

``neumann_step(Tensor(a!)[] c, Tensor(b!)[] p, Tensor[] h, Tensor alpha) -> ()``
    ``c_i <- c_i - alpha * h_i``; ``p_i <- p_i + c_i`` (the new ``c_i``).
``axpy_dot(Tensor(a!)[] y, Tensor a, Tensor[] x, Tensor[] z) -> Tensor``
    ``y_i <- y_i + a * x_i``; returns ``sum_i <y_i, z_i>`` with the new ``y``
    (``z`` the empty list ``[]``: ``sum_i <y_i, y_i>``).
``cg_update(Tensor(a!)[] x, Tensor(b!)[] r, Tensor[] d, Tensor[] q, Tensor a) -> Tensor``
    ``x_i <- x_i + a * d_i``; ``r_i <- r_i - a * q_i``; returns ``sum_i <r_i, r_i>`` (new ``r``).
``multi_dot(Tensor[] x, Tensor[] y) -> Tensor``
    ``sum_i <x_i, y_i>`` (``y`` the empty list ``[]``: ``sum_i <x_i, x_i>``).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from .. import _compiled, backend
from ..reference import solver as _reference  # noqa: F401  (registers the reference backend)

try:  # Triton kernels (another engineer's file); optional
    from ..triton_kernels import solver as _triton  # noqa: F401
except Exception:  # pragma: no cover
    _triton = None

KERNEL_OPS = ("neumann_step", "axpy_dot", "cg_update", "multi_dot", "adam_step", "adam_step_backward")
_compiled.register_kernel_ops(KERNEL_OPS)

_FLOATS_CPU = (torch.float32, torch.float64)
_FLOATS_GPU = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_scalar(xs, *rest):
    return xs[0].new_empty((), dtype=_acc_dtype(xs[0].dtype))


for _prefix in ("cpp_", "cuda_"):
    if _compiled.loaded():
        for _name in ("axpy_dot", "cg_update", "multi_dot"):
            if _compiled._has_op(_prefix + _name):
                torch.library.register_fake("commentaries_ext::" + _prefix + _name)(_fake_scalar)
        if _compiled._has_op(_prefix + "adam_step"):
            torch.library.register_fake("commentaries_ext::" + _prefix + "adam_step")(
                lambda p, g, m, v, *hp: ([t.new_empty(t.shape) for t in p], [t.new_empty(t.shape) for t in m],
                                         [t.new_empty(t.shape) for t in v]))
        if _compiled._has_op(_prefix + "adam_step_backward"):
            torch.library.register_fake("commentaries_ext::" + _prefix + "adam_step_backward")(
                lambda gp, gm, gv, g, m, v, *hp_mask: tuple(
                    [t.new_empty(t.shape) for t in like] if on else [] for like, on in zip((g, m, v), hp_mask[-1])))
        if _compiled._has_op(_prefix + "neumann_step"):
            torch.library.register_fake("commentaries_ext::" + _prefix + "neumann_step")(lambda c, p, h, alpha: None)


# ----------------------------------------------------------------- device-independent ops


@torch.library.custom_op("commentaries_ext::neumann_step", mutates_args=("c", "p"))
def neumann_step_op(c: list[Tensor], p: list[Tensor], h: list[Tensor], alpha: Tensor) -> None:
    backend.kernel("neumann_step", c[0].device)(c, p, h, alpha)


@neumann_step_op.register_fake
def _(c, p, h, alpha):
    return None


@torch.library.custom_op("commentaries_ext::axpy_dot", mutates_args=("y",))
def axpy_dot_op(y: list[Tensor], a: Tensor, x: list[Tensor], z: list[Tensor]) -> Tensor:
    return backend.kernel("axpy_dot", y[0].device)(y, a, x, z)


@axpy_dot_op.register_fake
def _(y, a, x, z):
    return _fake_scalar(y)


@torch.library.custom_op("commentaries_ext::cg_update", mutates_args=("x", "r"))
def cg_update_op(x: list[Tensor], r: list[Tensor], d: list[Tensor], q: list[Tensor], a: Tensor) -> Tensor:
    return backend.kernel("cg_update", x[0].device)(x, r, d, q, a)


@cg_update_op.register_fake
def _(x, r, d, q, a):
    return _fake_scalar(x)


@torch.library.custom_op("commentaries_ext::multi_dot", mutates_args=())
def multi_dot_op(x: list[Tensor], y: list[Tensor]) -> Tensor:
    return backend.kernel("multi_dot", x[0].device)(x, y)


@multi_dot_op.register_fake
def _(x, y):
    return _fake_scalar(x)


# ----------------------------------------------------------------- validation

VecLike = Union[Tensor, Sequence[Tensor]]


def _as_list(name: str, fn: str, v: VecLike) -> list[Tensor]:
    if isinstance(v, Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        for i, t in enumerate(v):
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: {name}[{i}] must be a Tensor, got {type(t).__name__}")
        return list(v)
    raise TypeError(f"{fn}: {name} must be a Tensor or a list of Tensors, got {type(v).__name__}")


def _validate(fn: str, mutated: dict[str, VecLike], read: dict[str, VecLike],
              op: str | None = None) -> tuple[dict, torch.device, torch.dtype]:
    lists = {k: _as_list(k, fn, v) for k, v in {**mutated, **read}.items()}
    names = list(lists)
    first = lists[names[0]]
    for k in names[1:]:
        if len(lists[k]) != len(first):
            raise ValueError(f"{fn}: {k} has {len(lists[k])} tensors but {names[0]} has {len(first)}")
    if not first:
        return lists, torch.device("cpu"), torch.float32
    ref = first[0]
    dev, dtype = ref.device, ref.dtype
    allowed = _FLOATS_CPU if dev.type == "cpu" else _FLOATS_GPU
    shapes = [t.shape for t in first]
    for k in names:
        ts = lists[k]
        if all(t.device == dev and t.dtype == dtype for t in ts) and [t.shape for t in ts] == shapes:
            continue  # the common case, checked without a Python loop per tensor below
        for i, t in enumerate(ts):
            if t.device != dev:
                raise ValueError(f"{fn}: {k}[{i}] is on {t.device} but {names[0]}[0] is on {dev}")
            if t.dtype != dtype:
                raise TypeError(f"{fn}: {k}[{i}] has dtype {t.dtype} but {names[0]}[0] has dtype {dtype}")
            if t.shape != first[i].shape:
                raise ValueError(f"{fn}: {k}[{i}] has shape {tuple(t.shape)} but {names[0]}[{i}] has shape "
                                 f"{tuple(first[i].shape)}")
    if dtype not in allowed:
        where = "on the GPU" if dev.type != "cpu" else "on the CPU"
        raise TypeError(f"{fn}: {names[0]}[0] (and the others) has dtype {dtype}, which is not supported {where}; expected one of "
                        f"{[str(d).replace('torch.', '') for d in allowed]}")
    if dev.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError(f"{fn}: {names[0]}[0] (and the others) is on the meta device (no data to compute on)")
    mut = [(k, i, t) for k in mutated for i, t in enumerate(lists[k])]
    for k, i, t in mut:
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {k}[{i}] is updated in place and must be contiguous")
    for k in read:
        ts = lists[k]
        if not all(t.is_contiguous() for t in ts):
            lists[k] = [t.contiguous() for t in ts]
    if mut and not torch.compiler.is_compiling() and not (op is not None and dev.type == "cpu"
                                                          and backend.select(op, dev)[0] == "cpp"):
        # (the C++ kernel op ``op`` checks this itself, with the same message: not twice on the hot path)
        _check_overlap(fn, mut, [(k, i, t) for k in read for i, t in enumerate(lists[k])])
    return lists, dev, dtype


def _check_overlap(fn: str, mut: list, read: list) -> None:
    """No tensor updated in place may share memory with another updated tensor or with one
    that is read (the kernels read and write them in one pass, in parallel): exact aliases
    and partly overlapping views alike.  Every tensor is contiguous here (read tensors that
    were not are copies), so each spans ``[data_ptr, data_ptr + nbytes)``; one sort and sweep."""
    items = [(t.data_ptr(), t.numel() * t.element_size(), True, k, i) for k, i, t in mut]
    items += [(t.data_ptr(), t.numel() * t.element_size(), False, k, i) for k, i, t in read]
    items.sort()
    end_mut = end_any = -1
    last_mut = last_any = None
    for start, nbytes, is_mut, k, i in items:
        if not nbytes:
            continue
        other = last_any if (is_mut and start < end_any) else last_mut if (not is_mut and start < end_mut) else None
        if other is not None:
            a, b = (f"{other[1]}[{other[2]}]", f"{k}[{i}]") if (is_mut and not other[0]) else \
                (f"{k}[{i}]", f"{other[1]}[{other[2]}]")
            raise ValueError(f"{fn}: {a} shares memory with {b}, which is updated in place; the updated "
                             "vectors must not alias or overlap any other argument")
        end = start + nbytes
        if end > end_any:
            end_any, last_any = end, (is_mut, k, i)
        if is_mut and end > end_mut:
            end_mut, last_mut = end, (is_mut, k, i)


def _run(op, name: str, device: torch.device, mutated: list[list[Tensor]], *args):
    """Call the device-independent op when tracing (torch.compile sees the registered
    op), else the selected kernel directly (skips the custom-op layers, ~50 us), bumping
    the version counters of the mutated tensors as the custom op does."""
    if torch.compiler.is_compiling():
        return op(*args)
    out = backend.kernel(name, device)(*args)
    for ts in mutated:
        torch.autograd.graph.increment_version(ts)
    return out


def _scalar(fn: str, name: str, a, device: torch.device, dtype: torch.dtype) -> Tensor:
    acc = _acc_dtype(dtype)
    if isinstance(a, Tensor):
        if a.is_complex():
            raise TypeError(f"{fn}: {name} must be real, got dtype {a.dtype}")
        if a.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a number or a 0-dim tensor, got shape {tuple(a.shape)}")
        if a.device != device and a.device.type != "cpu":
            raise ValueError(f"{fn}: {name} is on {a.device} but the vectors are on {device}")
        return a.detach().reshape(()).to(device=device, dtype=acc)
    if isinstance(a, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a number or a 0-dim tensor, got {type(a).__name__}")
    try:
        value = float(a)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a number or a 0-dim tensor, got {type(a).__name__}") from None
    return torch.tensor(value, dtype=acc, device=device)


def _nonempty(ts: list[Tensor]) -> list[int]:
    return [i for i, t in enumerate(ts) if t.numel() > 0]


# ----------------------------------------------------------------- public functions


@torch.no_grad()
def neumann_step_(c: VecLike, p: VecLike, h: VecLike, alpha) -> None:
    """``c <- c - alpha*h ; p <- p + c`` in place, in one fused pass."""
    lists, dev, dtype = _validate("neumann_step_", {"c": c, "p": p}, {"h": h}, "neumann_step")
    keep = _nonempty(lists["c"])
    a = _scalar("neumann_step_", "alpha", alpha, dev, dtype)
    if not keep:
        return None
    cs, ps, hs = ([lists[k][i] for i in keep] for k in ("c", "p", "h"))
    _run(neumann_step_op, "neumann_step", dev, [cs, ps], cs, ps, hs, a)
    return None


@torch.no_grad()
def axpy_dot_(y: VecLike, a, x: VecLike, z: VecLike | None = None) -> Tensor:
    """``y <- y + a*x`` in place; returns ``<y, z>`` with the updated ``y`` (``z`` None: ``<y, y>``)."""
    ylist = _as_list("y", "axpy_dot_", y)
    self_dot = z is None
    if z is not None:
        zlist = _as_list("z", "axpy_dot_", z)
        # z = y (the same tensors, or views of exactly the same elements) means <y, y>; any
        # other overlap is refused by _validate's overlap check
        if len(zlist) == len(ylist) and all(zi is yi or (zi.numel() and zi.data_ptr() == yi.data_ptr()
                                                         and zi.shape == yi.shape and zi.stride() == yi.stride()
                                                         and zi.dtype == yi.dtype) for zi, yi in zip(zlist, ylist)):
            self_dot = True
    read = {"x": x} if self_dot else {"x": x, "z": z}
    lists, dev, dtype = _validate("axpy_dot_", {"y": y}, read, "axpy_dot")
    av = _scalar("axpy_dot_", "a", a, dev, dtype)
    keep = _nonempty(lists["y"])
    if not keep:
        return torch.zeros((), dtype=_acc_dtype(dtype), device=dev)
    ys, xs = [lists["y"][i] for i in keep], [lists["x"][i] for i in keep]
    zs = [] if self_dot else [lists["z"][i] for i in keep]
    return _run(axpy_dot_op, "axpy_dot", dev, [ys], ys, av, xs, zs)


@torch.no_grad()
def cg_update_(x: VecLike, r: VecLike, d: VecLike, q: VecLike, a) -> Tensor:
    """``x <- x + a*d ; r <- r - a*q`` in place; returns ``<r, r>`` (one pass, one result)."""
    lists, dev, dtype = _validate("cg_update_", {"x": x, "r": r}, {"d": d, "q": q}, "cg_update")
    av = _scalar("cg_update_", "a", a, dev, dtype)
    keep = _nonempty(lists["x"])
    if not keep:
        return torch.zeros((), dtype=_acc_dtype(dtype), device=dev)
    xs, rs, ds, qs = ([lists[k][i] for i in keep] for k in ("x", "r", "d", "q"))
    return _run(cg_update_op, "cg_update", dev, [xs, rs], xs, rs, ds, qs, av)


@torch.no_grad()
def dot(x: VecLike, y: VecLike) -> Tensor:
    """``sum_i <x_i, y_i>`` as a 0-dim tensor."""
    xl, yl = _as_list("x", "dot", x), _as_list("y", "dot", y)
    same = len(xl) == len(yl) and all(a is b for a, b in zip(xl, yl))
    lists, dev, dtype = _validate("dot", {}, {"x": xl} if same else {"x": xl, "y": yl})
    keep = _nonempty(lists["x"])
    if not keep:
        return torch.zeros((), dtype=_acc_dtype(dtype), device=dev)
    return _run(multi_dot_op, "multi_dot", dev, [], [lists["x"][i] for i in keep],
                [] if same else [lists["y"][i] for i in keep])


@torch.no_grad()
def norm(x: VecLike) -> Tensor:
    """``sqrt(sum_i <x_i, x_i>)`` as a 0-dim tensor."""
    lists, dev, dtype = _validate("norm", {}, {"x": x})
    keep = _nonempty(lists["x"])
    if not keep:
        return torch.zeros((), dtype=_acc_dtype(dtype), device=dev)
    return _run(multi_dot_op, "multi_dot", dev, [], [lists["x"][i] for i in keep], []).sqrt_()


__all__ = ["neumann_step_", "axpy_dot_", "cg_update_", "dot", "norm", "KERNEL_OPS"]
