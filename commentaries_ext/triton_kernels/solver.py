"""Triton kernels of the fused solver updates over lists of tensors.

Contract: ``commentaries_ext/ops/solver.py``.  Multi-tensor apply: one launch
covers every tensor of the lists without concatenating them.  A small device
table holds the data pointers of each list and, per program, the tensor it
works on and the start of its block; the program casts the pointer back
(``int64 -> pointer``).  The table is cached per set of buffers (a solver
reuses the same buffers every iteration), so a step costs one launch (plus
one for the final sum of the per-block dot partials).  Dot products: one
float32 (float64 for float64 data) partial per block, summed in float64.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .. import backend
from ._common import acc_dtype, on_tensor_device, tl_acc

BLOCK = 2048
_CACHE_SIZE = 16
_tables: "OrderedDict[tuple, tuple]" = OrderedDict()

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check_lists(op: str, names: tuple, n_mutated: int, lists: list[list[torch.Tensor]]) -> None:
    """What the kernels assume of a direct call of the op (the public functions check it before,
    ``ops/solver.py``): equal lengths and shapes, one dtype and device, contiguous tensors, and
    no tensor updated in place sharing memory with another argument.  Run when a table is
    made; the table's key holds what these depend on, so a hit needs no check."""
    fn = f"{op} (triton)"
    first = lists[0]
    for k, ts in zip(names, lists):
        if len(ts) != len(first):
            raise ValueError(f"{fn}: {k} has {len(ts)} tensors but {names[0]} has {len(first)}")
        for i, t in enumerate(ts):
            if t.shape != first[i].shape:
                raise ValueError(f"{fn}: {k}[{i}] has shape {tuple(t.shape)} but {names[0]}[{i}] has shape "
                                 f"{tuple(first[i].shape)}")
            if t.dtype != first[0].dtype or t.device != first[0].device:
                raise TypeError(f"{fn}: {k}[{i}] is {t.dtype} on {t.device} but {names[0]}[0] is "
                                f"{first[0].dtype} on {first[0].device}")
            if not t.is_contiguous():
                raise ValueError(f"{fn}: {k}[{i}] must be contiguous")
    from ..ops.solver import _check_overlap

    mut = [(k, i, t) for k, ts in zip(names[:n_mutated], lists) for i, t in enumerate(ts)]
    read = [(k, i, t) for k, ts in zip(names[n_mutated:], lists[n_mutated:]) for i, t in enumerate(ts)]
    if mut:
        _check_overlap(fn, mut, read)


def _table(op: str, names: tuple, n_mutated: int, lists: list[list[torch.Tensor]]):
    """(pointers [len(lists), T] int64, tensor index per block, block start, numel per tensor, n_blocks)."""
    if lists[0][0].is_cuda and torch.cuda.is_current_stream_capturing():
        # a cached table can be evicted (freed) while a graph still reads it, and a new one is
        # copied from host memory at the call: replays would read stale tables
        raise RuntimeError("triton solver ops cannot be captured in a CUDA graph (their tensor tables are "
                           "built on the host)")
    dev0 = lists[0][0].device
    # the stream too: a table is copied (non_blocking) and freed on the stream that made it, so a
    # hit from another stream could read it before the copy lands, or after its memory is reused
    stream = torch.cuda.current_stream(dev0).cuda_stream if dev0.type == "cuda" else 0
    key = (tuple(len(ts) for ts in lists), op, names,
           tuple((t.data_ptr(), t.shape, t.dtype, t.is_contiguous()) for ts in lists for t in ts), str(dev0), stream)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    _check_lists(op, names, n_mutated, lists)
    first = lists[0]
    dev = first[0].device
    numels = [t.numel() for t in first]
    nblocks = [triton.cdiv(k, BLOCK) for k in numels]
    ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in lists], dtype=torch.int64)
    tidx = torch.repeat_interleave(torch.arange(len(first), dtype=torch.int32), torch.tensor(nblocks))
    starts = torch.cat([torch.arange(b, dtype=torch.int64) * BLOCK for b in nblocks])
    host = (ptrs, tidx, starts, torch.tensor(numels, dtype=torch.int64))
    if dev.type != "cpu":
        host = tuple(h.pin_memory().to(dev, non_blocking=True) for h in host)
    entry = (*host, int(sum(nblocks)))
    _tables[key] = entry
    if len(_tables) > _CACHE_SIZE:
        _tables.popitem(last=False)
    return entry


@triton.jit
def _locate(PTRS, TIDX, STARTS, NUMELS, T, which, DT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(TIDX + pid)
    start = tl.load(STARTS + pid)
    numel = tl.load(NUMELS + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    return t, offs, mask


@triton.jit
def _ptr(PTRS, T, which, t, DT: tl.constexpr):
    return tl.load(PTRS + which * T + t).to(tl.pointer_type(DT))


@triton.jit
def _neumann_kernel(PTRS, TIDX, STARTS, NUMELS, T, ALPHA, DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, mask = _locate(PTRS, TIDX, STARTS, NUMELS, T, 0, DT, BLOCK)
    c_ptr = _ptr(PTRS, T, 0, t, DT)
    p_ptr = _ptr(PTRS, T, 1, t, DT)
    h_ptr = _ptr(PTRS, T, 2, t, DT)
    a = tl.load(ALPHA).to(ACC)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    c = c - a * h
    c_st = c.to(DT)
    tl.store(c_ptr + offs, c_st, mask=mask)
    tl.store(p_ptr + offs, (p + c_st.to(ACC)).to(DT), mask=mask)


@triton.jit
def _axpy_dot_kernel(PTRS, TIDX, STARTS, NUMELS, T, A, PART, HAS_Z: tl.constexpr, DT: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    """y += a*x (lists 0, 1); partial <y, z> (list 2, or y)."""
    t, offs, mask = _locate(PTRS, TIDX, STARTS, NUMELS, T, 0, DT, BLOCK)
    y_ptr = _ptr(PTRS, T, 0, t, DT)
    x_ptr = _ptr(PTRS, T, 1, t, DT)
    a = tl.load(A).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y_st = (y + a * x).to(DT)
    tl.store(y_ptr + offs, y_st, mask=mask)
    y = y_st.to(ACC)
    if HAS_Z:
        z = tl.load(_ptr(PTRS, T, 2, t, DT) + offs, mask=mask, other=0.0).to(ACC)
    else:
        z = y
    tl.store(PART + tl.program_id(0), tl.sum(tl.where(mask, y * z, 0.0), axis=0))


@triton.jit
def _cg_kernel(PTRS, TIDX, STARTS, NUMELS, T, A, PART, DT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """x += a*d ; r -= a*q (lists x, r, d, q); partial <r, r>."""
    t, offs, mask = _locate(PTRS, TIDX, STARTS, NUMELS, T, 0, DT, BLOCK)
    x_ptr = _ptr(PTRS, T, 0, t, DT)
    r_ptr = _ptr(PTRS, T, 1, t, DT)
    d_ptr = _ptr(PTRS, T, 2, t, DT)
    q_ptr = _ptr(PTRS, T, 3, t, DT)
    a = tl.load(A).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(x_ptr + offs, (x + a * d).to(DT), mask=mask)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
    r_st = (r - a * q).to(DT)
    tl.store(r_ptr + offs, r_st, mask=mask)
    r = r_st.to(ACC)
    tl.store(PART + tl.program_id(0), tl.sum(tl.where(mask, r * r, 0.0), axis=0))


@triton.jit
def _dot_kernel(PTRS, TIDX, STARTS, NUMELS, T, PART, HAS_Y: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    t, offs, mask = _locate(PTRS, TIDX, STARTS, NUMELS, T, 0, DT, BLOCK)
    x = tl.load(_ptr(PTRS, T, 0, t, DT) + offs, mask=mask, other=0.0).to(ACC)
    if HAS_Y:
        y = tl.load(_ptr(PTRS, T, 1, t, DT) + offs, mask=mask, other=0.0).to(ACC)
    else:
        y = x
    tl.store(PART + tl.program_id(0), tl.sum(tl.where(mask, x * y, 0.0), axis=0))


def _meta(op: str, names: tuple, n_mutated: int, lists):
    ptrs, tidx, starts, numels, nblocks = _table(op, names, n_mutated, lists)
    dt = lists[0][0].dtype
    return (ptrs, tidx, starts, numels, len(lists[0])), nblocks, _TL[dt], tl_acc(dt), acc_dtype(dt)


def _finish(part: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return part.sum(dtype=torch.float64).to(acc)


def neumann_step(c, p, h, alpha) -> None:
    args, nb, dt, ACC, _ = _meta("neumann_step", ("c", "p", "h"), 2, [c, p, h])
    if nb:
        _neumann_kernel[(nb,)](*args, alpha, DT=dt, ACC=ACC, BLOCK=BLOCK, num_warps=4)


def axpy_dot(y, a, x, z):
    lists = [y, x] + ([z] if len(z) else [])
    args, nb, dt, ACC, acc = _meta("axpy_dot", ("y", "x", "z")[:len(lists)], 1, lists)
    part = torch.empty(max(nb, 1), dtype=acc, device=y[0].device)
    if nb == 0:
        return part.zero_()[0]
    _axpy_dot_kernel[(nb,)](*args, a, part, HAS_Z=len(z) > 0, DT=dt, ACC=ACC, BLOCK=BLOCK, num_warps=4)
    return _finish(part, acc)


def cg_update(x, r, d, q, a):
    args, nb, dt, ACC, acc = _meta("cg_update", ("x", "r", "d", "q"), 2, [x, r, d, q])
    part = torch.empty(max(nb, 1), dtype=acc, device=x[0].device)
    if nb == 0:
        return part.zero_()[0]
    _cg_kernel[(nb,)](*args, a, part, DT=dt, ACC=ACC, BLOCK=BLOCK, num_warps=4)
    return _finish(part, acc)


def multi_dot(x, y):
    lists = [x] + ([y] if len(y) else [])
    args, nb, dt, ACC, acc = _meta("multi_dot", ("x", "y")[:len(lists)], 0, lists)
    part = torch.empty(max(nb, 1), dtype=acc, device=x[0].device)
    if nb == 0:
        return part.zero_()[0]
    _dot_kernel[(nb,)](*args, part, HAS_Y=len(y) > 0, DT=dt, ACC=ACC, BLOCK=BLOCK, num_warps=4)
    return _finish(part, acc)


backend.register("triton", "neumann_step", on_tensor_device(neumann_step))
backend.register("triton", "axpy_dot", on_tensor_device(axpy_dot))
backend.register("triton", "cg_update", on_tensor_device(cg_update))
backend.register("triton", "multi_dot", on_tensor_device(multi_dot))
