"""Triton kernels of the weighted / blended softmax cross-entropy (``wce_*``).

Signatures and semantics: DEVELOPING.md ("cross_entropy").  Each program
handles a tile of ``BLOCK_N`` rows x ``BLOCK_C`` columns and walks the columns
of its rows in blocks of ``BLOCK_C`` (online logsumexp in the forward), so one
launch covers both many short rows (``C`` = 10: 256 rows per program) and few
long rows (``C`` = 50k: one row per program, a loop over column blocks).
Logits, ``u`` and ``t`` may have any row/column strides; outputs are new
contiguous tensors.  Math in float32 (float64 for float64 input); bf16/fp16
inputs are read as is and converted in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backend
from ._common import acc_dtype, next_pow2, num_warps_for, on_tensor_device, tl_acc

# Largest column block and tile (elements) of one program.  Tests lower
# MAX_BLOCK_C to exercise the column loop with small C.
MAX_BLOCK_C = 4096
MAX_TILE = 4096


def _blocks(n: int, c: int) -> tuple[int, int]:
    block_c = min(next_pow2(c), MAX_BLOCK_C)
    block_n = max(1, min(MAX_TILE // block_c, next_pow2(n)))
    return block_n, block_c


@triton.jit
def _mix_terms(Y, YB, LAM, rows64, rmask, sy, syb, slam, ignore_index, HAS_MIX: tl.constexpr, ACC: tl.constexpr):
    """Per-row target, partner target, lam (1 without mixing) and validity."""
    y = tl.load(Y + rows64 * sy, mask=rmask, other=ignore_index)
    valid = rmask & (y != ignore_index)
    if HAS_MIX:
        yb = tl.load(YB + rows64 * syb, mask=valid, other=0)
        lam = tl.load(LAM + rows64 * slam, mask=valid, other=1.0).to(ACC)
    else:
        yb = y
        lam = tl.full(y.shape, 1.0, ACC)
    y = tl.where(valid, y, 0)
    yb = tl.where(valid, yb, 0)
    return y, yb, lam, valid


@triton.jit
def _wce_forward_kernel(Z, Y, YB, LAM, LOSS, LSE, N, C, szn, szc, sy, syb, slam, ignore_index,
                        HAS_MIX: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    zrow = Z + rows64 * szn
    cols = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.zeros([BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        mask = rmask[:, None] & (cc < C)[None, :]
        z = tl.load(zrow[:, None] + cc.to(tl.int64)[None, :] * szc, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # an infinite max shifts by 0: no exp(inf - inf) (a +inf logit gives s = +inf, lse = +inf)
        m_safe = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(s > 0.0, m_safe + tl.log(tl.where(s > 0.0, s, 1.0)), float("-inf"))
    lse = tl.where(s != s, s, lse)  # a NaN logit: NaN, not -inf
    y, yb, lam, valid = _mix_terms(Y, YB, LAM, rows64, rmask, sy, syb, slam, ignore_index, HAS_MIX, ACC)
    # a target out of range (a direct call of the op: the Python layer checks) gives a NaN loss,
    # never a load outside the row
    in_range = (y >= 0) & (y < C)
    if HAS_MIX:
        in_range = in_range & (yb >= 0) & (yb < C)
    zy = tl.load(zrow + y * szc, mask=valid & in_range, other=0.0).to(ACC)
    tgt = tl.where(lam == 0.0, 0.0, lam * zy)
    if HAS_MIX:
        zb = tl.load(zrow + yb * szc, mask=valid & in_range, other=0.0).to(ACC)
        tgt += tl.where(lam == 1.0, 0.0, (1.0 - lam) * zb)
    loss = tl.where(valid, tl.where(in_range, lse - tgt, float("nan")), 0.0)
    tl.store(LOSS + rows64, loss.to(LOSS.dtype.element_ty), mask=rmask)
    tl.store(LSE + rows64, lse.to(LSE.dtype.element_ty), mask=rmask)


@triton.jit
def _wce_backward_kernel(G, Z, LSE, Y, YB, LAM, OUT, N, C, sg, szn, szc, slse, sy, syb, slam, ignore_index,
                         HAS_MIX: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    zrow = Z + rows64 * szn
    orow = OUT + rows64 * C
    cols = tl.arange(0, BLOCK_C)
    y, yb, lam, valid = _mix_terms(Y, YB, LAM, rows64, rmask, sy, syb, slam, ignore_index, HAS_MIX, ACC)
    # a target out of range (a direct call of the op) gives a NaN row, as the forward's loss
    in_range = (y >= 0) & (y < C)
    if HAS_MIX:
        in_range = in_range & (yb >= 0) & (yb < C)
    g = tl.load(G + rows64 * sg, mask=valid, other=0.0).to(ACC)
    g = tl.where(in_range, g, float("nan"))
    lse = tl.load(LSE + rows64 * slse, mask=rmask, other=0.0).to(ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        mask = rmask[:, None] & (cc < C)[None, :]
        z = tl.load(zrow[:, None] + cc.to(tl.int64)[None, :] * szc, mask=mask, other=0.0).to(ACC)
        d = tl.exp(z - lse[:, None])
        d -= tl.where(cc[None, :] == y[:, None], lam[:, None], 0.0)
        if HAS_MIX:
            d -= tl.where(cc[None, :] == yb[:, None], 1.0 - lam[:, None], 0.0)
        out = tl.where(valid[:, None], g[:, None] * d, 0.0)
        tl.store(orow[:, None] + cc[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _wce_hvp_kernel(Z, LSE, SCALE, U, OUT, N, C, szn, szc, slse, ssc, sun, suc,
                    ACC: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    zrow = Z + rows64 * szn
    urow = U + rows64 * sun
    orow = OUT + rows64 * C
    cols = tl.arange(0, BLOCK_C)
    lse = tl.load(LSE + rows64 * slse, mask=rmask, other=0.0).to(ACC)
    sc = tl.load(SCALE + rows64 * ssc, mask=rmask, other=0.0).to(ACC)
    if SINGLE:  # the row fits in one block: read it once
        mask = rmask[:, None] & (cols < C)[None, :]
        z = tl.load(zrow[:, None] + cols.to(tl.int64)[None, :] * szc, mask=mask, other=float("-inf")).to(ACC)
        u = tl.load(urow[:, None] + cols.to(tl.int64)[None, :] * suc, mask=mask, other=0.0).to(ACC)
        pu = tl.exp(z - lse[:, None]) * u
        pu = tl.where(mask, pu, 0.0)
        dot = tl.sum(pu, axis=1)
        out = sc[:, None] * (pu - tl.exp(z - lse[:, None]) * dot[:, None])
        tl.store(orow[:, None] + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK_N], ACC)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = rmask[:, None] & (cc < C)[None, :]
            z = tl.load(zrow[:, None] + cc.to(tl.int64)[None, :] * szc, mask=mask, other=float("-inf")).to(ACC)
            u = tl.load(urow[:, None] + cc.to(tl.int64)[None, :] * suc, mask=mask, other=0.0).to(ACC)
            dot += tl.sum(tl.where(mask, tl.exp(z - lse[:, None]) * u, 0.0), axis=1)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = rmask[:, None] & (cc < C)[None, :]
            z = tl.load(zrow[:, None] + cc.to(tl.int64)[None, :] * szc, mask=mask, other=float("-inf")).to(ACC)
            u = tl.load(urow[:, None] + cc.to(tl.int64)[None, :] * suc, mask=mask, other=0.0).to(ACC)
            p = tl.exp(z - lse[:, None])
            out = sc[:, None] * (p * u - p * dot[:, None])
            tl.store(orow[:, None] + cc[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _wce_jvp_kernel(Z, LSE, Y, YB, LAM, T, OUT, N, C, szn, szc, slse, sy, syb, slam, stn, stc, ignore_index,
                    HAS_MIX: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    zrow = Z + rows64 * szn
    trow = T + rows64 * stn
    cols = tl.arange(0, BLOCK_C)
    y, yb, lam, valid = _mix_terms(Y, YB, LAM, rows64, rmask, sy, syb, slam, ignore_index, HAS_MIX, ACC)
    lse = tl.load(LSE + rows64 * slse, mask=rmask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        mask = valid[:, None] & (cc < C)[None, :]
        z = tl.load(zrow[:, None] + cc.to(tl.int64)[None, :] * szc, mask=mask, other=float("-inf")).to(ACC)
        t = tl.load(trow[:, None] + cc.to(tl.int64)[None, :] * stc, mask=mask, other=0.0).to(ACC)
        acc += tl.sum(tl.where(mask, tl.exp(z - lse[:, None]) * t, 0.0), axis=1)
    # minus mix . t: two gathers per row; a target out of range (a direct call of the op: the
    # Python layer checks) gives NaN, as in the forward, never a load outside the row
    in_range = (y >= 0) & (y < C)
    if HAS_MIX:
        in_range = in_range & (yb >= 0) & (yb < C)
    ty = tl.load(trow + y * stc, mask=valid & in_range, other=0.0).to(ACC)
    acc -= tl.where(lam == 0.0, 0.0, lam * ty)
    if HAS_MIX:
        tb = tl.load(trow + yb * stc, mask=valid & in_range, other=0.0).to(ACC)
        acc -= tl.where(lam == 1.0, 0.0, (1.0 - lam) * tb)
    acc = tl.where(valid, tl.where(in_range, acc, float("nan")), 0.0)
    tl.store(OUT + rows64, acc.to(OUT.dtype.element_ty), mask=rmask)


# ----------------------------------------------------------------- launchers


def _check_inputs(op: str, logits: torch.Tensor, rows: dict, like: dict) -> None:
    """Shapes and devices of the inputs (the kernels index rows and columns with them): a direct
    call with a bad input is an error, not an access out of bounds. The targets' range is guarded
    in the forward kernel (a NaN loss, no load): checking it here would synchronise with the host."""
    if logits.dim() != 2:
        raise RuntimeError(f"{op}: logits must be [N, C]")
    if "lam" in rows and (rows["target_b"] is None) != (rows["lam"] is None):  # as check_mix_pair in C++
        raise RuntimeError(f"{op}: target_b and lam come together (the blended form needs both), got "
                           f"{'target_b' if rows['lam'] is None else 'lam'} alone")
    for name, t in rows.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != logits.shape[0] or t.device != logits.device):
            raise RuntimeError(f"{op}: {name} must have shape [{logits.shape[0]}] on the logits' device, got "
                               f"{tuple(t.shape)} on {t.device}")
    for name, t in like.items():
        if t.shape != logits.shape or t.device != logits.device:
            raise RuntimeError(f"{op}: {name} must have the shape of logits {tuple(logits.shape)} on their device, "
                               f"got {tuple(t.shape)} on {t.device}")


def _mix_args(target, target_b, lam):  # (_check_inputs: both or neither)
    has_mix = target_b is not None
    if has_mix:
        return True, target_b, lam, target_b.stride(0), lam.stride(0)
    return False, target, target, 0, 0  # dummies, never read


def wce_forward(logits: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor | None,
                lam: torch.Tensor | None, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs("wce_forward", logits, {"target": target, "target_b": target_b, "lam": lam}, {})
    n, c = logits.shape
    row_dtype = acc_dtype(logits.dtype)
    loss = backend.new_output(n, dtype=row_dtype, device=logits.device)
    lse = backend.new_output(n, dtype=row_dtype, device=logits.device)
    if n == 0:
        return loss, lse
    if c == 0:  # no classes: lse = -inf, loss 0 (as the reference)
        return loss.zero_(), lse.fill_(float("-inf"))
    has_mix, yb, lm, syb, slam = _mix_args(target, target_b, lam)
    block_n, block_c = _blocks(n, c)
    _wce_forward_kernel[(triton.cdiv(n, block_n),)](
        logits, target, yb, lm, loss, lse, n, c, logits.stride(0), logits.stride(1), target.stride(0), syb, slam,
        int(ignore_index), HAS_MIX=has_mix, ACC=tl_acc(logits.dtype), BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=num_warps_for(block_n * block_c))
    return loss, lse


def wce_backward(grad_loss: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                 target_b: torch.Tensor | None, lam: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    _check_inputs("wce_backward", logits, {"grad_loss": grad_loss, "lse": lse, "target": target,
                                           "target_b": target_b, "lam": lam}, {})
    n, c = logits.shape
    out = backend.new_output(n, c, like=logits)
    if n == 0 or c == 0:
        return out
    has_mix, yb, lm, syb, slam = _mix_args(target, target_b, lam)
    block_n, block_c = _blocks(n, c)
    _wce_backward_kernel[(triton.cdiv(n, block_n),)](
        grad_loss, logits, lse, target, yb, lm, out, n, c, grad_loss.stride(0), logits.stride(0), logits.stride(1),
        lse.stride(0), target.stride(0), syb, slam, int(ignore_index), HAS_MIX=has_mix, ACC=tl_acc(logits.dtype),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps_for(block_n * block_c))
    return out


def wce_hvp(logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _check_inputs("wce_hvp", logits, {"lse": lse, "scale": scale}, {"u": u})
    n, c = logits.shape
    out = backend.new_output(n, c, like=logits)
    if n == 0 or c == 0:
        return out
    block_n, block_c = _blocks(n, c)
    _wce_hvp_kernel[(triton.cdiv(n, block_n),)](
        logits, lse, scale, u, out, n, c, logits.stride(0), logits.stride(1), lse.stride(0), scale.stride(0),
        u.stride(0), u.stride(1), ACC=tl_acc(logits.dtype), SINGLE=c <= block_c, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=num_warps_for(block_n * block_c))
    return out


def wce_jvp(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, target_b: torch.Tensor | None,
            lam: torch.Tensor | None, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    _check_inputs("wce_jvp", logits, {"lse": lse, "target": target, "target_b": target_b, "lam": lam}, {"t": t})
    n, c = logits.shape
    out = backend.new_output(n, dtype=acc_dtype(logits.dtype), device=logits.device)
    if n == 0:
        return out
    if c == 0:
        return out.zero_()
    has_mix, yb, lm, syb, slam = _mix_args(target, target_b, lam)
    block_n, block_c = _blocks(n, c)
    _wce_jvp_kernel[(triton.cdiv(n, block_n),)](
        logits, lse, target, yb, lm, t, out, n, c, logits.stride(0), logits.stride(1), lse.stride(0),
        target.stride(0), syb, slam, t.stride(0), t.stride(1), int(ignore_index), HAS_MIX=has_mix,
        ACC=tl_acc(logits.dtype), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps_for(block_n * block_c))
    return out


KERNELS = {"wce_forward": wce_forward, "wce_backward": wce_backward, "wce_hvp": wce_hvp, "wce_jvp": wce_jvp}
for _name, _fn in KERNELS.items():
    backend.register("triton", _name, on_tensor_device(_fn))
