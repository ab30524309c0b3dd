"""Triton kernels of masked blending (``blend_forward``, ``blend_backward``).

Contract: ``commentaries_ext/ops/blend.py``.  A row of ``x_a`` (contiguous or
channels-last) is one dense block of ``F`` elements in memory order; programs
are (row, block of that row).  The mask ``m`` (any strides, broadcast dims) is
addressed through up to three coalesced trailing dimensions in ``x_a``'s memory
order.  The partner row is ``perm[n]`` of ``x_b`` (or ``x_a``), gathered in the
kernel, never materialised.  The scattered gradients (``perm``, repeats
accumulate) are gathered instead of scattered: a CSR inverse of ``perm`` (built
on the device, no host sync) lists the source rows of each output row, so the
result is deterministic and needs no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backend
from ._common import acc_dtype, num_warps_for, on_tensor_device, tl_acc

BLOCK = 1024
# blocks of a row per launch along grid axis 1 (CUDA allows 65535; tests lower it to exercise the loop)
MAX_GRID_1 = 65535


def _m_layout(x_a: torch.Tensor, m: torch.Tensor):
    """(msn, [(size, m_stride)] * 3) over x_a's trailing dims in memory order, or None if > 3 dims."""
    shape = x_a.shape
    me = m.expand(shape)
    dims = sorted(range(1, x_a.dim()), key=lambda d: -x_a.stride(d))
    dims = [d for d in dims if shape[d] != 1]
    merged: list[list[int]] = []
    for d in dims:
        size, st = shape[d], me.stride(d)
        if merged and merged[-1][1] == st * size:
            merged[-1] = [merged[-1][0] * size, st]
        else:
            merged.append([size, st])
    if len(merged) > 3:
        return None
    while len(merged) < 3:
        merged.insert(0, [1, 0])
    return me.stride(0), merged


@triton.jit
def _m_offsets(k, MS1, MS2, MS3, S2, S3):
    i3 = k % S3
    r = k // S3
    i2 = r % S2
    i1 = r // S2
    return i1.to(tl.int64) * MS1 + i2.to(tl.int64) * MS2 + i3.to(tl.int64) * MS3


@triton.jit
def _blend_fwd_kernel(XA, XB, M, PERM, OUT, F, sxa, sxb, msn, MS1, MS2, MS3, S2, S3,
                      HAS_PERM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    n64 = n.to(tl.int64)
    if HAS_PERM:
        src = tl.load(PERM + n64)
    else:
        src = n64
    # grid axis 1 is capped: loop over the rest of the row (int64: rows near 2^31 elements)
    for k0 in range(tl.program_id(1).to(tl.int64) * BLOCK, F, tl.num_programs(1).to(tl.int64) * BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < F
        xa = tl.load(XA + n64 * sxa + k, mask=mask, other=0.0).to(ACC)
        xb = tl.load(XB + src * sxb + k, mask=mask, other=0.0).to(ACC)
        mv = tl.load(M + n64 * msn + _m_offsets(k, MS1, MS2, MS3, S2, S3), mask=mask, other=0.0).to(ACC)
        out = mv * xa + (1.0 - mv) * xb  # exact for a 0/1 mask (not a lerp)
        tl.store(OUT + n64 * sxa + k, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _blend_bwd_kernel(G, XA, XB, M, PERM, GXA, GXB, PROD, F, sxa, sxb, sgxb, msn, MS1, MS2, MS3, S2, S3,
                      HAS_PERM: tl.constexpr, WANT_GXA: tl.constexpr, WANT_GXB: tl.constexpr,
                      WANT_PROD: tl.constexpr, ROWSUM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise part: grad*m (no scatter), grad*(1-m) (x_b without perm), grad*(x_a-xb)
    (ROWSUM: one partial sum per program instead, for a per-example m)."""
    n = tl.program_id(0)
    n64 = n.to(tl.int64)
    if HAS_PERM:
        src = tl.load(PERM + n64)
    else:
        src = n64
    part = tl.zeros([BLOCK], ACC)
    # grid axis 1 is capped: loop over the rest of the row (int64: rows near 2^31 elements)
    for k0 in range(tl.program_id(1).to(tl.int64) * BLOCK, F, tl.num_programs(1).to(tl.int64) * BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < F
        g = tl.load(G + n64 * sxa + k, mask=mask, other=0.0).to(ACC)
        mv = tl.load(M + n64 * msn + _m_offsets(k, MS1, MS2, MS3, S2, S3), mask=mask, other=0.0).to(ACC)
        if WANT_GXA:
            tl.store(GXA + n64 * sxa + k, (g * mv).to(GXA.dtype.element_ty), mask=mask)
        if WANT_GXB:
            tl.store(GXB + n64 * sgxb + k, (g * (1.0 - mv)).to(GXB.dtype.element_ty), mask=mask)
        if WANT_PROD:
            xa = tl.load(XA + n64 * sxa + k, mask=mask, other=0.0).to(ACC)
            xb = tl.load(XB + src * sxb + k, mask=mask, other=0.0).to(ACC)
            if ROWSUM:
                part += tl.where(mask, g * (xa - xb), 0.0)
            else:
                tl.store(PROD + n64 * F + k, g * (xa - xb), mask=mask)
    if WANT_PROD:
        if ROWSUM:
            tl.store(PROD + n64 * tl.num_programs(1) + tl.program_id(1), tl.sum(part, axis=0))


@triton.jit
def _blend_gather_kernel(G, M, OUT, ORDER, OFFS, F, sg, sout, msn, MS1, MS2, MS3, S2, S3,
                         SELF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = (SELF: g[i]*m[i]) + sum_{n: perm[n] = i} g[n]*(1-m[n]); sources from the CSR inverse."""
    i = tl.program_id(0)
    i64 = i.to(tl.int64)
    start = tl.load(OFFS + i64)
    end = tl.load(OFFS + i64 + 1)
    # grid axis 1 is capped: loop over the rest of the row (int64: rows near 2^31 elements)
    for k0 in range(tl.program_id(1).to(tl.int64) * BLOCK, F, tl.num_programs(1).to(tl.int64) * BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < F
        moff = _m_offsets(k, MS1, MS2, MS3, S2, S3)
        acc = tl.zeros([BLOCK], ACC)
        if SELF:
            g = tl.load(G + i64 * sg + k, mask=mask, other=0.0).to(ACC)
            mv = tl.load(M + i64 * msn + moff, mask=mask, other=0.0).to(ACC)
            acc += g * mv
        for j in range(start, end):
            n = tl.load(ORDER + j)
            g = tl.load(G + n * sg + k, mask=mask, other=0.0).to(ACC)
            mv = tl.load(M + n * msn + moff, mask=mask, other=0.0).to(ACC)
            acc += g * (1.0 - mv)
        tl.store(OUT + i64 * sout + k, acc.to(OUT.dtype.element_ty), mask=mask)


def _grid(rows: int, f: int) -> tuple[int, int]:
    """(rows, blocks of a row); the blocks capped at MAX_GRID_1 (CUDA's grid y limit), the
    kernels loop over the rest."""
    return rows, min(triton.cdiv(f, BLOCK), MAX_GRID_1)


def _check_layout(x_a: torch.Tensor, m: torch.Tensor, x_b: torch.Tensor | None, perm: torch.Tensor | None, f: int,
                  op: str) -> None:
    """The layout contract the kernels' addressing relies on (a direct kernel-op call gets an
    error, not an access out of bounds), as csrc/blend_contract.h checks it for the C++ and CUDA
    kernels: x_a contiguous or channels-last; m of x_a's rank, dtype and device, N rows, other
    dimensions 1 or x_a's; x_b with x_a's dtype, device, trailing sizes and strides (size-1
    dimensions aside) and dense rows, N rows without perm; perm contiguous int64 [N]. perm's range
    is not checked (on a GPU it would synchronise with the host): masked_blend validates it."""
    n = x_a.shape[0]
    if not (x_a.is_contiguous() or (x_a.dim() == 4 and x_a.is_contiguous(memory_format=torch.channels_last))):
        raise RuntimeError(f"{op}: x_a must be contiguous or channels-last")
    if m.dim() != x_a.dim():
        raise RuntimeError(f"{op}: m must have x_a's rank {x_a.dim()}, got {m.dim()}")
    if m.dtype != x_a.dtype or m.device != x_a.device:
        raise RuntimeError(f"{op}: m must have x_a's dtype and device")
    if m.shape[0] != n:
        raise RuntimeError(f"{op}: m must have x_a's {n} rows, got {m.shape[0]}")
    if any(ms not in (1, xs) for ms, xs in zip(m.shape[1:], x_a.shape[1:])):
        raise RuntimeError(f"{op}: m of shape {tuple(m.shape)} does not broadcast to x_a of shape "
                           f"{tuple(x_a.shape)} (each dimension 1 or x_a's)")
    if x_b is not None:
        if x_b.dtype != x_a.dtype or x_b.device != x_a.device:
            raise RuntimeError(f"{op}: x_b must have x_a's dtype and device")
        if (x_b.dim() != x_a.dim() or x_b.shape[1:] != x_a.shape[1:] or (x_b.shape[0] > 1 and x_b.stride(0) != f)
                or any(x_b.shape[d] != 1 and x_b.stride(d) != x_a.stride(d) for d in range(1, x_a.dim()))):
            raise RuntimeError(f"{op}: x_b must have x_a's trailing sizes and memory layout, with dense rows")
        if perm is None and x_b.shape[0] != n:
            raise RuntimeError(f"{op}: without perm, x_b must have x_a's {n} rows")
    if perm is not None and (perm.dtype != torch.int64 or perm.shape != (n,) or not perm.is_contiguous()
                             or perm.device != x_a.device):
        raise RuntimeError(f"{op}: perm must be a contiguous int64 tensor of shape [{n}] on x_a's device")


def _layout_or_materialise(x_a, m):
    lay = _m_layout(x_a, m)
    if lay is None:  # more than three non-mergeable trailing dims: expand m like x_a
        m = torch.empty_like(x_a).copy_(m.expand(x_a.shape))
        lay = _m_layout(x_a, m)
    msn, ((_, ms1), (s2, ms2), (s3, ms3)) = lay
    return m, (msn, ms1, ms2, ms3, s2, s3)


def blend_forward(x_a: torch.Tensor, m: torch.Tensor, x_b: torch.Tensor | None, perm: torch.Tensor | None):
    out = torch.empty_like(x_a)
    if backend._poison:
        out.fill_(float("nan"))
    n = x_a.shape[0]
    f = x_a.numel() // n if n else 0
    if n == 0 or f == 0:
        return out
    _check_layout(x_a, m, x_b, perm, f, "blend_forward")
    m, margs = _layout_or_materialise(x_a, m)
    xb = x_a if x_b is None else x_b
    grid = _grid(n, f)
    _blend_fwd_kernel[grid](x_a, xb, m, perm if perm is not None else x_a, out, f, x_a.stride(0), xb.stride(0),
                            *margs, HAS_PERM=perm is not None, ACC=tl_acc(x_a.dtype), BLOCK=BLOCK,
                            num_warps=num_warps_for(BLOCK))
    return out


def _csr(perm: torch.Tensor, rows: int):
    order = torch.argsort(perm, stable=True)
    offs = torch.searchsorted(perm[order], torch.arange(rows + 1, device=perm.device, dtype=perm.dtype))
    return order, offs


def blend_backward(grad: torch.Tensor, x_a: torch.Tensor, m: torch.Tensor, x_b: torch.Tensor | None,
                   perm: torch.Tensor | None, output_mask: list[bool]):
    n = x_a.shape[0]
    f = x_a.numel() // n if n else 0
    want_xa, want_xb, want_m = bool(output_mask[0]), bool(output_mask[1]) and x_b is not None, bool(output_mask[2])

    def poisoned_like(t):
        o = torch.empty_like(t)
        if backend._poison:
            o.fill_(float("nan"))
        return o

    gxa = poisoned_like(x_a) if want_xa else x_a.new_empty(0)
    gxb = poisoned_like(x_b) if want_xb else x_a.new_empty(0)
    gm = backend.new_output(m.shape, like=m) if want_m else x_a.new_empty(0)
    if n == 0 or f == 0:
        if want_xb:
            gxb.zero_()
        if want_m:
            gm.zero_()
        return gxa, gxb, gm
    if grad.shape != x_a.shape or grad.stride() != x_a.stride() or grad.dtype != x_a.dtype or grad.device != x_a.device:
        raise RuntimeError("blend_backward: grad must have x_a's shape, strides, dtype and device")
    _check_layout(x_a, m, x_b, perm, f, "blend_backward")
    m_orig = m
    m, margs = _layout_or_materialise(x_a, m)
    acc = acc_dtype(x_a.dtype)
    ACC = tl_acc(x_a.dtype)
    xb_src = x_a if x_b is None else x_b
    scatter_xa = want_xa and perm is not None and x_b is None
    scatter_xb = want_xb and perm is not None
    ew_xa = want_xa and not scatter_xa
    ew_xb = want_xb and not scatter_xb
    full_m = all(m_orig.shape[d] == x_a.shape[d] for d in range(x_a.dim()))
    per_example = all(m_orig.shape[d] == 1 for d in range(1, x_a.dim()))
    grid = _grid(n, f)
    width = grid[1] if per_example else f
    prod = torch.empty((n, width), dtype=acc, device=x_a.device) if want_m else x_a.new_empty(0, dtype=acc)
    if ew_xa or ew_xb or want_m:
        _blend_bwd_kernel[grid](grad, x_a, xb_src, m, perm if perm is not None else x_a, gxa if ew_xa else grad,
                                gxb if ew_xb else grad, prod, f, x_a.stride(0), xb_src.stride(0),
                                gxb.stride(0) if ew_xb else 0, *margs,
                                HAS_PERM=perm is not None, WANT_GXA=ew_xa, WANT_GXB=ew_xb, WANT_PROD=want_m,
                                ROWSUM=per_example, ACC=ACC, BLOCK=BLOCK, num_warps=num_warps_for(BLOCK))
    if scatter_xa or scatter_xb:
        rows = n if x_b is None else x_b.shape[0]
        order, offs = _csr(perm, rows)
        out = gxa if scatter_xa else gxb
        _blend_gather_kernel[_grid(rows, f)](
            grad, m, out, order, offs, f, grad.stride(0), out.stride(0), *margs, SELF=scatter_xa, ACC=ACC,
            BLOCK=BLOCK, num_warps=num_warps_for(BLOCK))
    if want_m and per_example:
        gm.copy_(prod.sum(1).reshape(m_orig.shape))
    elif want_m:
        # prod is in x_a's memory order; view it with x_a's logical shape, reduce over m's size-1 dims
        p = prod.view(-1).as_strided(x_a.shape, [s if d else f for d, s in enumerate(x_a.stride())])
        dims = [d for d in range(x_a.dim()) if m_orig.shape[d] == 1 and x_a.shape[d] != 1]
        red = p if full_m or not dims else p.sum(dim=dims, keepdim=True)
        gm.copy_(red.reshape(m_orig.shape))
    return gxa, gxb, gm


backend.register("triton", "blend_forward", on_tensor_device(blend_forward))
backend.register("triton", "blend_backward", on_tensor_device(blend_backward))
