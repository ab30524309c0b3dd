"""Fuzz tests: random and adversarial input to the public entry points.

Every case is drawn by hypothesis, together with an *oracle* that knows the
documented contract: which arguments of the drawn call are invalid.  The
outcome must then be

* valid input:   a result equal to a float64 plain-PyTorch reference
  (``F.cross_entropy``-style formulas written out here) within the precision
  contract of the kernels (float32 math: errors scale with ``eps * |input|``);
* invalid input: an exception of a documented type (``ValueError`` and its
  subclasses ``BatchError`` / ``CommentaryFileError`` / ``CommentaryMismatchError``,
  ``TypeError``, ``IndexError``, ``RuntimeError``, ``NonFiniteError``) whose
  message names one of the invalid arguments;

never another exception type, a silently accepted invalid input, a wrong
value, a hang (``faulthandler`` ends the process after a timeout) or a crash:
the C++ kernels run in this process, so a segfault fails the run.

Categories and the number of cases each tried are counted in ``COUNTS`` and
printed by the last test (``pytest -s tests/test_fuzz.py``).
"""
from __future__ import annotations

import collections
import faulthandler
import json
import math
import os
import pickle
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from commentaries_ext import files
from commentaries_ext.commentary import (
    AttentionMask,
    Blending,
    ExampleWeighting,
    TabularWeighting,
    commentary_loss,
    plain_ops,
)
from commentaries_ext.commentary.base import BatchError, NonFiniteError
from commentaries_ext.files import CommentaryFileError, CommentaryMismatchError, load_commentary, read_metadata
from commentaries_ext.ops import blend as bl
from commentaries_ext.ops import cross_entropy as ce
from commentaries_ext.ops import solver as sv

COUNTS: collections.Counter = collections.Counter()  # category -> cases tried
OUTCOMES: collections.Counter = collections.Counter()  # (category, "ok" | "error") -> cases

CLEAR = (ValueError, TypeError, IndexError, RuntimeError, NonFiniteError)  # BatchError & co. are ValueErrors
F32, F64 = torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")
BAD_DTYPES = [torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
SPECIALS = [NAN, INF, -INF, 1e30, -1e30, 1e4, -1e4, 0.0, 1e-30]
EPS = {F32: torch.finfo(F32).eps, F64: torch.finfo(F64).eps}
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))  # more (or fewer) examples per test, e.g. FUZZ_SCALE=10


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


@pytest.fixture(autouse=True)
def _no_hang():
    """A hang fails the run: dump every thread's stack and exit after 10 minutes."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _names(msg: str, name: str) -> bool:
    """``name`` occurs in ``msg`` as a word of its own ("x" is not in "axpy_dot_", "target" not in "target_b")."""
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", msg) is not None


REASONS: collections.Counter = collections.Counter()  # (category, invalid argument) -> cases


def run_case(cat: str, fn, reasons: list[str]):
    """Run one drawn case: ``reasons`` lists the invalid arguments (empty: valid input)."""
    COUNTS[cat] += 1
    for r in set(reasons):
        REASONS[cat, r] += 1
    try:
        out = fn()
    except CLEAR as e:
        msg = str(e)
        assert reasons, f"{cat}: valid input raised {type(e).__name__}: {msg}"
        assert any(_names(msg, r) for r in reasons), f"{cat}: {type(e).__name__} names none of {reasons}: {msg!r}"
        OUTCOMES[cat, "error"] += 1
        return None, e
    assert not reasons, f"{cat}: invalid input accepted; expected an error naming one of {reasons}"
    OUTCOMES[cat, "ok"] += 1
    return out, None


def _close(cat, got, want, atol, rtol, what):
    """``got`` (any dtype) equals the float64 reference ``want`` within ``atol`` (tensor or float) and
    ``rtol``; NaN exactly where the reference is NaN, infinities equal."""
    got = got.detach().to(F64)
    want = want.detach().to(F64)
    assert got.shape == want.shape, f"{cat}: {what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    gn, wn = torch.isnan(got), torch.isnan(want)
    assert torch.equal(gn, wn), f"{cat}: {what}: NaN at {gn.nonzero().tolist()}, reference NaN at {wn.nonzero().tolist()}"
    gi, wi = torch.isinf(got), torch.isinf(want)
    assert torch.equal(gi, wi) and torch.equal(got[gi], want[wi]), f"{cat}: {what}: infinities differ {got} vs {want}"
    fin = ~(gn | gi)
    atol = torch.as_tensor(atol, dtype=F64).expand(want.shape)
    err = (got - want).abs()[fin]
    bound = (atol + rtol * want.abs())[fin]
    assert bool((err <= bound).all()), (f"{cat}: {what} differs from the float64 reference by up to "
                                        f"{float((err - bound).max()):.3g} beyond the tolerance\n got {got}\nwant {want}")


# --------------------------------------------------------------------------- drawing tensors


def _values(draw, shape, special: bool) -> torch.Tensor:
    """float64 values of ``shape``: N(0, 3^2), with a few adversarial values when ``special``."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = math.prod(shape)
    v = torch.randn(n, generator=g, dtype=F64) * 3
    if special and n:
        for _ in range(draw(st.integers(1, min(n, 4)))):
            v[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    return v.reshape(shape)


def _cast(v: torch.Tensor, dtype) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return v.to(dtype)
    return torch.nan_to_num(v, nan=0.0, posinf=1e6, neginf=-1e6).clamp(-1e6, 1e6).to(dtype)


def _layout(draw, x: torch.Tensor, kinds=("contig", "contig", "transposed", "strided", "expanded", "offset")):
    """The same values in another memory layout (a view with other strides)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided" and x.dim() >= 1:
        k = x.shape[-1]
        buf = torch.zeros(*x.shape[:-1], 2 * k + 1, dtype=x.dtype)
        if buf.is_floating_point():
            buf.fill_(NAN)  # anything read from the gaps shows
        view = buf[..., 0:2 * k:2]
        view.copy_(x)
        return view
    if kind == "expanded" and x.dim() >= 1 and x.shape[0] >= 1:
        return x[:1].expand(x.shape)
    if kind == "offset":
        buf = torch.zeros(x.numel() + 3, dtype=x.dtype)
        view = buf[3:].view(x.shape)
        view.copy_(x)
        return view
    return x.contiguous()


def rare(draw, k: int) -> bool:
    """True about once in ``k + 1`` draws (hypothesis favours the first choice, so False comes first)."""
    return draw(st.sampled_from([False] * k + [True]))


def _meta(draw, t, p=0.06):
    """Now and then the same tensor on the 'meta' device (a wrong device on a CPU machine)."""
    if torch.is_tensor(t) and rare(draw, round(1 / p)):
        return t.to("meta")
    return t


def _row_tensor(draw, n, want_dtype, name):
    """A per-row argument (weight / lam / scale): a good tensor, a number or something wrong.
    Returns (value, float64 reference [n] or None, reasons)."""
    kind = draw(st.sampled_from(["good"] * 6 + ["number", "scalar", "dtype", "shape", "list", "meta"]))
    vals = torch.rand(n, generator=torch.Generator().manual_seed(draw(st.integers(0, 10**6))), dtype=F64)
    if kind == "number":
        x = draw(st.sampled_from([0.0, 0.3, 1.0, 1, 2.5]))
        return x, torch.full((n,), float(x), dtype=F64).to(want_dtype).to(F64), []
    if kind == "scalar":
        t = torch.tensor(0.7, dtype=want_dtype)
        return t, t.to(F64).expand(n), []
    if kind == "dtype":
        dt = draw(st.sampled_from([d for d in (F32, F64, torch.float16, torch.int64, torch.bool) if d != want_dtype]))
        return _cast(vals, dt), None, [name]
    if kind == "shape":
        return vals[: max(0, n - 1)].to(want_dtype) if n else torch.rand(2, dtype=want_dtype), None, [name]
    if kind == "list":
        return vals.tolist(), None, [name]
    t = _layout(draw, vals.to(want_dtype), ("contig", "strided", "offset", "expanded"))
    if kind == "meta":
        return t.to("meta"), None, [name]
    return t, t.to(F64), []


# --------------------------------------------------------------------------- cross-entropy reference


def ref_rows(z, y, yb, lam, ii):
    """float64 per-row (blended) cross-entropy with the kernels' conventions: 0 on ignored rows,
    terms with a zero coefficient dropped."""
    n, c = z.shape
    if n == 0:
        return z.new_zeros(0)
    valid = y != ii
    z = torch.where(valid[:, None], z, 0.0)  # ignored rows: no NaN from their logits, not even in gradients
    lse = torch.logsumexp(z, 1)
    ys = torch.where(valid, y, 0)
    zy = z.gather(1, ys[:, None])[:, 0]
    if yb is None:
        tgt = zy
    else:
        zb = z.gather(1, torch.where(valid, yb, 0)[:, None])[:, 0]
        tgt = torch.where(lam == 0, 0.0, lam * zy) + torch.where(lam == 1, 0.0, (1 - lam) * zb)
    return torch.where(valid, lse - tgt, 0.0)


def ref_reduce(rows, w, reduction, y, ii):
    if reduction == "none":
        return rows if w is None else rows * w
    s = rows.sum() if w is None else (rows * w).sum()
    if reduction == "sum":
        return s
    return s / (y != ii).sum().to(F64)


def _row_scale(z64: torch.Tensor) -> torch.Tensor:
    """max |finite logit| per row (the rounding error of the float32 math scales with it)."""
    a = torch.where(torch.isfinite(z64), z64.abs(), 0.0)
    return a.amax(1) if z64.shape[1] else z64.new_zeros(z64.shape[0])


def _tol(dtype):
    return (5e-5, 2e-5) if dtype == F32 else (1e-9, 1e-9)


def _target(draw, n, c, ii, name):
    """(target, reasons) -- in range, with ignored rows, out of range, another dtype/shape/device."""
    kind = draw(st.sampled_from(["good"] * 8 + ["ignored"] * 3 + ["out", "dtype", "shape", "none", "meta"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    t = torch.randint(0, max(c, 1), (n,), generator=g)
    if kind == "ignored" and n:
        t[torch.rand(n, generator=g) < 0.4] = ii
    if kind == "out" and n:
        t[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, -3, c, c + 5, 2**40, -2**40]))
    if kind == "none":
        return draw(st.sampled_from([None, [0] * n, 1.5])), [name]
    if kind == "dtype":
        dt = draw(st.sampled_from([torch.int32, torch.int16, torch.uint8, F32, torch.bool, torch.complex64]))
        t = t.to(dt)
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            return t, [name]
    if kind == "shape":
        return draw(st.sampled_from([t[:, None], torch.cat([t, t[:1]]) if n else torch.zeros(1, dtype=torch.long),
                                     t[:0] if n else torch.zeros(2, dtype=torch.long)])), [name]
    t = _layout(draw, t, ("contig", "strided", "offset", "expanded"))
    if kind == "meta":
        return t.to("meta"), [name]
    return t, []


def _range_ok(t: torch.Tensor, c: int, ii: int, rows_of: torch.Tensor | None = None) -> bool:
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= c)
    skip = (t if rows_of is None else rows_of.to(torch.int64)) == ii
    return not bool((bad & ~skip).any())


@settings(max_examples=examples(4000), **FUZZ)
@given(st.data())
def test_fuzz_cross_entropy(data):
    d = data.draw
    op = d(st.sampled_from(["weighted", "blended", "per_example", "hvp", "jvp"]), label="op")
    cat = f"cross_entropy.{op}"
    n = d(st.sampled_from([3, 1, 2, 5, 4, 6, 0]), label="n")
    c = d(st.sampled_from([3, 5, 1, 2, 7, 4, 6, 9, 0]), label="c")
    reasons: list[str] = []
    # ---- logits
    lkind = d(st.sampled_from(["2d"] * 20 + ["1d", "3d", "list"]))
    ldtype = d(st.sampled_from([F32] * 8 + [F64] * 8 + BAD_DTYPES))
    special = d(st.booleans())
    z64 = _values(d, (n, c), special)
    if lkind == "list":
        logits = z64.tolist()
        reasons.append("logits")
    else:
        logits = _layout(d, _cast(z64, ldtype))
        if lkind == "1d":
            logits = logits.reshape(-1)
        elif lkind == "3d":
            logits = logits[..., None]
        logits = _meta(d, logits, 0.03)
        if lkind != "2d" or ldtype not in (F32, F64) or logits.device.type == "meta" or (c == 0 and n > 0):
            reasons.append("logits")
    ok_logits = not reasons
    rd = ldtype if ldtype in (F32, F64) else F32  # the per-row dtype
    # ---- ignore_index
    ii = d(st.sampled_from([-100] * 12 + [0, c - 1 if c else 0, 2, 2**62, -(2**70), True, 1.5, "x"]))
    if isinstance(ii, bool) or not isinstance(ii, int) or not -(2**63) <= ii < 2**63:
        reasons.append("ignore_index")
        ii_num = -100
    else:
        ii_num = ii
    # ---- targets and mixing
    tname = "target_a" if op == "blended" else "target"
    target, r = _target(d, n, c, ii_num, tname)
    reasons += r
    tb = lam = None
    lam64 = None
    mixed = op == "blended" or (op in ("per_example", "jvp") and d(st.booleans()))
    if mixed:
        tb, rb = _target(d, n, c, ii_num, "target_b")
        lam, lam64, rl = _row_tensor(d, n, rd, "lam")
        reasons += rb + rl
        if op != "blended" and rare(d, 9):  # only one of the two
            if d(st.booleans()):
                tb = None
            else:
                lam = None
            reasons.append("target_b and lam")
    if op != "blended" and mixed:
        reasons = [r for r in reasons if r not in ("target_b", "lam", "target_b and lam")] + (
            [] if tb is None and lam is None else ["target_b and lam"] if (tb is None) != (lam is None) else
            [r for r in reasons if r in ("target_b", "lam")])
        if tb is None and lam is None:
            mixed = False
    target_ok = torch.is_tensor(target) and tname not in reasons
    if ok_logits and target_ok and not _range_ok(target, c, ii_num):
        reasons.append(tname)
    if ok_logits and target_ok and torch.is_tensor(tb) and "target_b" not in reasons and tb.device.type == "cpu" \
            and tb.shape == (n,) and not (tb.is_floating_point() or tb.is_complex() or tb.dtype == torch.bool) \
            and not _range_ok(tb, c, ii_num, rows_of=target):
        reasons.append("target_b")
    if torch.is_tensor(target) and torch.is_tensor(logits) and target.device != logits.device \
            and tname not in reasons:
        reasons.append(tname)
    # ---- the other arguments
    weight = w64 = None
    if op in ("weighted", "blended") and d(st.booleans()):
        weight, w64, rw = _row_tensor(d, n, rd, "weight")
        reasons += rw
    reduction = d(st.sampled_from(["mean", "sum", "none"] * 3 + ["avg"]))
    if op in ("weighted", "blended") and reduction == "avg":
        reasons.append("reduction")
    check_finite = op != "hvp" and op != "jvp" and rare(d, 2)
    if check_finite and ok_logits and n * c and bool((logits.isnan() | (logits == INF)).any()):
        reasons.append("logits")
    u = None
    scale = s64 = None
    if op in ("hvp", "jvp"):
        name = "u" if op == "hvp" else "t"
        ukind = d(st.sampled_from(["good"] * 10 + ["dtype", "shape", "list", "meta"]))
        u64 = _values(d, (n, c), d(st.booleans()))
        u = _layout(d, _cast(u64, rd))
        if ukind == "dtype":
            u = u.to(F64 if rd == F32 else F32)
            reasons.append(name)
        elif ukind == "shape":
            u = u[:, :-1] if c else torch.zeros(n, 1, dtype=rd)
            reasons.append(name)
        elif ukind == "list":
            u = u.tolist()
            reasons.append(name)
        elif ukind == "meta":
            u = u.to("meta")
            reasons.append(name)
        if op == "hvp" and d(st.booleans()):
            scale, s64, rs = _row_tensor(d, n, rd, "scale")
            reasons += rs
    # ---- only the arguments the op takes count
    takes = {"weighted": {"logits", "target", "weight", "reduction", "ignore_index"},
             "blended": {"logits", "target_a", "target_b", "lam", "weight", "reduction", "ignore_index"},
             "per_example": {"logits", "target", "target_b", "lam", "ignore_index", "target_b and lam"},
             "hvp": {"logits", "u", "scale"},
             "jvp": {"logits", "target", "t", "target_b", "lam", "ignore_index", "target_b and lam"}}[op]
    reasons = [r for r in reasons if r in takes]
    # ---- the call
    if op == "weighted":
        fn = lambda z: ce.weighted_cross_entropy(z, target, weight, reduction=reduction, ignore_index=ii,  # noqa: E731
                                                 check_finite=check_finite)
    elif op == "blended":
        fn = lambda z: ce.blended_cross_entropy(z, target, tb, lam, weight, reduction=reduction,  # noqa: E731
                                                ignore_index=ii, check_finite=check_finite)
    elif op == "per_example":
        fn = lambda z: ce.per_example_cross_entropy(z, target, tb, lam, ignore_index=ii,  # noqa: E731
                                                    check_finite=check_finite)
    elif op == "hvp":
        fn = lambda z: ce.cross_entropy_hvp(z, u, scale)  # noqa: E731
    else:
        fn = lambda z: ce.cross_entropy_jvp(z, target, u, tb, lam, ignore_index=ii)  # noqa: E731
    out, err = run_case(cat, lambda: fn(logits), reasons)
    if err is not None:
        return
    # ---- valid: compare with the float64 reference on the same (rounded) inputs
    z = logits.to(F64)
    y = target.to(torch.int64) if torch.is_tensor(target) else None
    yb = tb.to(torch.int64) if tb is not None else None
    lam_r = None if lam is None else (lam64 if lam64 is not None else torch.full((n,), float(lam), dtype=F64))
    lam_r = None if lam_r is None else lam_r.to(rd).to(F64)
    assert out.dtype == rd, f"{cat}: output dtype {out.dtype}, expected {rd}"
    base, rtol = _tol(rd)
    zs = _row_scale(z)
    eps = EPS[rd]
    if op in ("weighted", "blended", "per_example"):
        rows = ref_rows(z, y, yb, lam_r, ii_num)
        atol_rows = base + 8 * eps * zs
        if op == "per_example":
            _close(cat, out, rows, atol_rows, rtol, "per-row loss")
        else:
            want = ref_reduce(rows, w64, reduction, y, ii_num)
            wabs = w64.abs() if w64 is not None else torch.ones(n, dtype=F64)
            if reduction == "none":
                _close(cat, out, want, atol_rows * wabs, rtol, "loss")
            else:
                at = float((atol_rows * wabs).sum()) + base
                if reduction == "mean":
                    at = at / max(1, int((y != ii_num).sum()))
                _close(cat, out, want, at, rtol + n * eps, "reduced loss")
        # gradients (NaN / +-inf rows included; not beyond the float32 precision contract of p)
        if op != "per_example" and n and float((EPS[rd] * zs).max()) < 1e-3:
            _check_ce_grads(cat, op, logits, target, tb, lam, weight, reduction, ii, ii_num, rd)
        return
    lse = torch.logsumexp(z, 1) if c else z.new_full((n,), -INF)
    p = torch.exp(z - lse[:, None])
    uu = u.to(F64)
    # p = exp(z - lse) has the relative error of lse (float32: ~ulp(max|z|)); beyond 0.05 the
    # precision contract promises no digits, only p in [0, 1] (checked as a bound)
    delta = 3e-6 + 4 * eps * zs if rd == F32 else 1e-12 + 4 * eps * zs
    umax = torch.where(torch.isfinite(uu), uu.abs(), 0.0).amax(1) if c else uu.new_zeros(n)
    if op == "hvp":
        s = s64 if s64 is not None else torch.full((n,), 1.0 if scale is None else float(scale), dtype=F64)
        s = s.to(rd).to(F64)
        want = s[:, None] * (p * uu - p * (p * uu).sum(1, keepdim=True))
        atol = (base + 3 * delta * s.abs() * umax)[:, None].expand(n, c)
    else:
        valid = y != ii_num
        mixd = torch.zeros_like(uu)
        if n and c:
            ys = torch.where(valid, y, 0)
            if yb is None:
                mixd.scatter_(1, ys[:, None], 1.0)
            else:
                ybs = torch.where(valid, yb, 0)
                mixd.scatter_add_(1, ys[:, None], lam_r[:, None])
                mixd.scatter_add_(1, ybs[:, None], (1 - lam_r)[:, None])
        # mix . t with the zero-coefficient terms dropped, as in the kernels
        tm = torch.where(mixd == 0, 0.0, mixd * uu).sum(1) if c else uu.new_zeros(n)
        want = torch.where(valid, (p * uu).sum(1) - tm, 0.0) if n else uu.new_zeros(0)
        atol = base + 3 * delta * umax
    loose = delta > 0.05
    if bool(loose.any()):  # no digits promised there: bounded, and exact on the other rows
        COUNTS[cat + " (|logits| beyond the float32 precision contract)"] += 1
        bound = 4 * (s.abs()[:, None] * umax[:, None] if op == "hvp" else umax) + 1
        rows_ok = ~loose
        fin = torch.isfinite(out.to(F64))
        assert bool((out.to(F64).abs()[fin] <= bound.expand_as(out)[fin]).all()), f"{cat}: unbounded result {out}"
        out, want, atol = out[rows_ok], want[rows_ok], atol[rows_ok]
    _close(cat, out, want, atol, rtol, op)


def _check_ce_grads(cat, op, logits, target, tb, lam, weight, reduction, ii, ii_num, rd):
    """d loss / d (logits, weight, lam) against float64 autograd on the same inputs."""
    COUNTS[cat + " (gradients)"] += 1
    zl = logits.detach().requires_grad_()  # keeps the drawn strides
    wl = weight.detach().requires_grad_() if torch.is_tensor(weight) and weight.dim() == 1 else weight
    ll = lam.detach().requires_grad_() if torch.is_tensor(lam) and lam.dim() == 1 else lam
    if op == "weighted":
        out = ce.weighted_cross_entropy(zl, target, wl, reduction=reduction, ignore_index=ii)
    else:
        out = ce.blended_cross_entropy(zl, target, tb, ll, wl, reduction=reduction, ignore_index=ii)
    g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    leaves = [t for t in (zl, wl, ll) if torch.is_tensor(t) and t.requires_grad]
    got = torch.autograd.grad(out, leaves, g.to(out.dtype), allow_unused=True)
    z64 = zl.detach().to(F64).requires_grad_()
    w64 = wl.detach().to(F64).requires_grad_() if torch.is_tensor(wl) and wl.requires_grad else None
    l64 = ll.detach().to(F64).requires_grad_() if torch.is_tensor(ll) and ll.requires_grad else None
    n = z64.shape[0]
    wr = w64 if w64 is not None else (None if weight is None else torch.as_tensor(
        weight, dtype=F64).to(rd).to(F64).expand(n))
    lr = l64 if l64 is not None else (None if lam is None else torch.as_tensor(lam, dtype=F64).to(rd).to(F64).expand(n))
    y = target.to(torch.int64)
    rows = ref_rows(z64, y, None if tb is None else tb.to(torch.int64), lr, ii_num)
    want_out = ref_reduce(rows, wr, reduction, y, ii_num)
    if reduction == "mean" and not bool((y != ii_num).any()):
        return  # 0/0 of an all-ignored mean
    ref_leaves = [t for t in (z64, w64, l64) if t is not None]
    want = torch.autograd.grad(want_out, ref_leaves, g, allow_unused=True)
    base, rtol = _tol(rd)
    scale = float(g.abs().max()) * (1 + float(wr.detach().abs().max()) if wr is not None else 1.0) * max(1, n)
    for name, a, b in zip(("logits", "weight", "lam"), got, want):
        if b is None:
            b = torch.zeros_like(ref_leaves[0])
        if a is None:
            a = torch.zeros_like(b)
        _close(cat, a, b, base * scale + 8 * EPS[rd] * scale * float(_row_scale(z64.detach()).max()), rtol,
               f"gradient w.r.t. {name}")


# --------------------------------------------------------------------------- masked blend


@settings(max_examples=examples(2500), **FUZZ)
@given(st.data())
def test_fuzz_masked_blend(data):
    d = data.draw
    cat = "blend.masked_blend"
    reasons: list[str] = []
    n = d(st.integers(0, 4), label="n")
    rest = tuple(d(st.lists(st.integers(0, 3), min_size=0, max_size=3), label="trailing"))
    shape = (n,) + rest
    xdt = d(st.sampled_from([F32] * 8 + [F64] * 8 + BAD_DTYPES))
    special = d(st.booleans())
    xa64 = _values(d, shape, special)
    x_a = _cast(xa64, xdt)
    if len(shape) == 4 and d(st.booleans()):
        x_a = x_a.contiguous(memory_format=torch.channels_last)
    else:
        x_a = _layout(d, x_a)
    x_a = _meta(d, x_a, 0.03)
    if xdt not in (F32, F64) or x_a.device.type == "meta":
        reasons.append("x_a")
    if rare(d, 30) and x_a.device.type != "meta":
        x_a = x_a.tolist()
        reasons.append("x_a")
    # m: per example, broadcast, full, or wrong
    mkind = d(st.sampled_from(["example"] * 3 + ["broadcast"] * 4 + ["full"] * 2 + ["scalar", "wrong", "dtype", "meta"]))
    if mkind == "example":
        mshape = (n,)
    elif mkind in ("broadcast", "dtype", "meta"):
        mshape = tuple(s if d(st.booleans()) else 1 for s in shape)
    elif mkind == "full":
        mshape = shape
    elif mkind == "scalar":
        mshape = ()
    else:
        mshape = tuple(s + d(st.integers(1, 2)) for s in shape) if shape else (2,)
    mv = torch.rand(mshape, dtype=F64, generator=torch.Generator().manual_seed(d(st.integers(0, 10**6))))
    if special and mv.numel() and d(st.booleans()):
        mv.view(-1)[0] = d(st.sampled_from([NAN, INF, -1e30, 2.0, -1.0]))
    m = _layout(d, mv.to(xdt if xdt in (F32, F64) else F32), ("contig", "transposed", "strided", "expanded"))
    if mkind == "dtype":
        m = m.to(F64 if xdt == F32 else F32)
    if mkind == "meta":
        m = m.to("meta")
    nd = len(shape)
    if mkind in ("dtype", "meta"):
        reasons.append("m")
    ms = tuple(m.shape)
    if not ((len(ms) == 1 and nd > 1 and ms[0] == n)
            or (len(ms) == nd and all(a in (1, b) for a, b in zip(ms, shape)))):
        reasons.append("m")
    # partner
    pkind = d(st.sampled_from(["perm", "perm", "x_b", "x_b_perm", "zero"]))
    x_b = perm = None
    rows = n
    xb64 = None
    if pkind in ("x_b", "x_b_perm"):
        mrows = n if pkind == "x_b" else d(st.integers(0, 5))
        xb64 = _values(d, (mrows,) + rest, special)
        x_b = _layout(d, _cast(xb64, xdt if xdt in (F32, F64) else F32))
        bkind = d(st.sampled_from(["good"] * 10 + ["dtype", "shape", "meta"]))
        if bkind == "dtype":
            x_b = x_b.to(F64 if xdt == F32 else F32)
            reasons.append("x_b")
        elif bkind == "shape":
            x_b = x_b[..., None]
            reasons.append("x_b")
        elif bkind == "meta":
            x_b = x_b.to("meta")
            reasons.append("x_b")
        rows = mrows
    if pkind in ("perm", "x_b_perm"):
        gp = torch.Generator().manual_seed(d(st.integers(0, 10**6)))
        perm = torch.randint(0, max(rows, 1), (n,), generator=gp)
        pk = d(st.sampled_from(["good"] * 10 + ["perm_of_n"] * 3 + ["neg", "big", "dtype", "bool", "shape", "meta"]))
        if pk == "perm_of_n":
            perm = torch.randperm(n, generator=gp)
        if pk in ("neg", "big") and n:
            perm[d(st.integers(0, n - 1))] = d(st.sampled_from([-1, -(2**40)])) if pk == "neg" else \
                d(st.sampled_from([rows, rows + 7, 2**40, 2**62]))
        if pk == "dtype":
            perm = perm.to(d(st.sampled_from([torch.int32, torch.uint8, torch.int16, F32])))
        if pk == "bool":
            perm = perm.bool()
            reasons.append("perm")
        if pk == "shape":
            perm = perm[:, None]
            reasons.append("perm")
        if perm.dtype.is_floating_point:
            reasons.append("perm")
        perm = _layout(d, perm, ("contig", "strided", "offset", "expanded"))
        if pk == "meta":
            perm = perm.to("meta")
            reasons.append("perm")
        if pk not in ("bool", "shape", "meta") and not perm.dtype.is_floating_point and n:
            pv = perm.to(torch.int64)
            if bool(((pv < 0) | (pv >= rows)).any()):
                reasons.append("perm")
    elif pkind == "x_b" and rows != n:
        reasons.append("x_b")
    out, err = run_case(cat, lambda: bl.masked_blend(x_a, m, x_b=x_b, perm=perm), reasons)
    if err is not None:
        return
    # float64 reference: m x_a + (1 - m) xb (the documented formula), zero partner: m x_a
    xa = x_a.to(F64)
    mm = m.to(F64)
    if mm.dim() == 1 and xa.dim() > 1:
        mm = mm.view(n, *([1] * (xa.dim() - 1)))
    if x_b is None and perm is None:
        want, scale = mm * xa, mm.abs() * xa.abs()
    else:
        src = xa if x_b is None else x_b.to(F64)
        xb = src if perm is None else src[perm.to(torch.int64)]
        want = mm * xa + (1 - mm) * xb
        scale = mm.abs() * xa.abs() + (1 - mm).abs() * xb.abs()
    assert out.dtype == x_a.dtype and out.shape == x_a.shape, f"{cat}: {out.dtype} {tuple(out.shape)}"
    eps = EPS[x_a.dtype]
    want = want.to(x_a.dtype).to(F64)  # the float32 result of a value beyond float32 range is +-inf
    if x_b is not None or perm is not None:
        # a term beyond the dtype's range (a mask far outside [0, 1] on a huge value) makes the result
        # depend on the order of evaluation (inf, NaN, or a float64 cancellation): compared elsewhere only
        big = torch.finfo(x_a.dtype).max
        inside = ~(((mm * xa).abs() > big) | (((1 - mm) * xb).abs() > big))  # (NaN terms stay compared)
        out, want, scale = out.to(F64)[inside], want[inside], scale[inside]
    _close(cat, out, want, 1e-300 + 4 * eps * torch.nan_to_num(scale, posinf=0.0), 4 * eps, "blend")
    if not special and out.numel() and (x_b is not None or perm is not None):
        _check_blend_grads(cat, x_a, m, x_b, perm)


def _check_blend_grads(cat, x_a, m, x_b, perm):
    COUNTS[cat + " (gradients)"] += 1
    xa = x_a.detach().requires_grad_()
    mm = m.detach().requires_grad_()
    xbl = x_b.detach().requires_grad_() if x_b is not None else None
    out = bl.masked_blend(xa, mm, x_b=xbl, perm=perm)
    g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    leaves = [t for t in (xa, mm, xbl) if t is not None]
    got = torch.autograd.grad(out, leaves, g.to(out.dtype))
    r = [t.detach().to(F64).requires_grad_() for t in leaves]
    xa64, m64 = r[0], r[1]
    mv = m64.view(x_a.shape[0], *([1] * (x_a.dim() - 1))) if (m64.dim() == 1 and x_a.dim() > 1) else m64
    src = xa64 if x_b is None else r[2]
    xb = src if perm is None else src[perm.to(torch.int64)]
    want = torch.autograd.grad(xb + mv * (xa64 - xb), r, g)
    eps = EPS[x_a.dtype]
    for name, a, b, leaf in zip(("x_a", "m", "x_b"), got, want, r):
        # sums over broadcast / gathered rows: the error grows with the number of terms
        terms = max(1, out.numel() // max(1, leaf.numel())) + x_a.shape[0]
        mag = float(g.abs().max()) * (1 + float(max(t.detach().abs().max() for t in r)))
        _close(cat, a, b, 8 * eps * terms * mag, 8 * eps * terms, f"gradient w.r.t. {name}")


# --------------------------------------------------------------------------- solver ops

SOLVER_SIG = {  # op -> (mutated arguments, read arguments, scalar)
    "neumann_step_": (("c", "p"), ("h",), "alpha"),
    "axpy_dot_": (("y",), ("x", "z"), "a"),
    "cg_update_": (("x", "r"), ("d", "q"), "a"),
    "dot": ((), ("x", "y"), None),
    "norm": ((), ("x",), None),
}


def _solver_oracle(op, lists, z_mode, mutated):
    """The invalid arguments of a drawn solver call (the contract of ``ops/solver.py``)."""
    skip = {"axpy_dot_": "z", "dot": "y"}.get(op) if z_mode in ("same", "aliased") else None
    order = [nm for nm in lists if nm != skip]
    bad = [nm for nm in order if not (torch.is_tensor(lists[nm]) or isinstance(lists[nm], list))
           or (isinstance(lists[nm], list) and not all(torch.is_tensor(t) for t in lists[nm]))]
    if bad:
        return bad
    L = {nm: [lists[nm]] if torch.is_tensor(lists[nm]) else lists[nm] for nm in order}
    first = L[order[0]]
    reasons = [nm for nm in order if len(L[nm]) != len(first)]
    if reasons:
        return reasons + [order[0]]
    if not first:
        return []
    ref = first[0]
    for nm in order:
        for i, t in enumerate(L[nm]):
            if t.device != ref.device or t.dtype != ref.dtype:
                reasons += [nm, order[0]]
            elif t.shape != first[i].shape:
                reasons.append(nm)
    if reasons:
        return reasons
    if ref.dtype not in (F32, F64) or ref.device.type == "meta":
        return [order[0]]
    for nm in order:
        for t in L[nm]:
            if nm in mutated and not t.is_contiguous():
                reasons.append(nm)
    if reasons:
        return reasons
    # no tensor updated in place may share memory with any other argument (copies of non-contiguous
    # read tensors excepted)
    slots = [(nm, i, t) for nm in order for i, t in enumerate(L[nm]) if t.numel() and t.is_contiguous()]
    for a, (na, ia, ta) in enumerate(slots):
        for nb, ib, tb in slots[a + 1:]:
            if na not in mutated and nb not in mutated:
                continue
            lo_a, lo_b = ta.data_ptr(), tb.data_ptr()
            if lo_a < lo_b + tb.numel() * tb.element_size() and lo_b < lo_a + ta.numel() * ta.element_size():
                reasons += [na, nb]
    if op == "axpy_dot_" and "z" in L and not reasons:
        if any(z.numel() and z.data_ptr() == y.data_ptr() for z, y in zip(L["z"], L["y"])):
            reasons += ["z", "y"]
    return reasons


@settings(max_examples=examples(3000), **FUZZ)
@given(st.data())
def test_fuzz_solver(data):
    d = data.draw
    op = d(st.sampled_from(sorted(SOLVER_SIG)), label="op")
    cat = f"solver.{op}"
    mutated, read, scalar = SOLVER_SIG[op]
    names = list(mutated) + list(read)
    k = d(st.integers(0, 3), label="tensors")
    shapes = [tuple(d(st.lists(st.integers(0, 4), min_size=1, max_size=2))) for _ in range(k)]
    dtype = d(st.sampled_from([F32] * 4 + [F64] * 4 + [torch.float16, torch.int64, torch.bool, torch.complex64]))
    special = d(st.booleans())
    lists = {nm: [_cast(_values(d, s, special), dtype) for s in shapes] for nm in names}
    z_mode = None  # axpy_dot_'s z (and dot's y): None, other tensors, or the same list as y (x)
    if op == "axpy_dot_":
        z_mode = d(st.sampled_from(["none", "given", "given", "same"]))
        if z_mode != "given":
            lists.pop("z")
    if op == "dot" and rare(d, 3):
        lists.pop("y")
        z_mode = "same"
    # one structural mutation
    mut = d(st.sampled_from(["none"] * 6 + ["length", "shape", "dtype", "meta", "element", "arg", "noncontig",
                                            "alias", "overlap", "disjoint", "read_overlap", "single"]))
    args = list(lists)
    victim = d(st.sampled_from(args))
    vlist = lists[victim] = list(lists[victim])  # a copy of the list (not of the tensors)
    if mut == "length":
        vlist.append(torch.zeros(1, dtype=dtype)) if d(st.booleans()) or not vlist else vlist.pop()
    elif mut in ("shape", "dtype", "meta", "element", "noncontig") and vlist:
        i = d(st.integers(0, len(vlist) - 1))
        t = vlist[i]
        if mut == "shape":
            vlist[i] = torch.zeros(t.numel() + 1, dtype=dtype)
        elif mut == "dtype":
            vlist[i] = t.to(F64 if dtype == F32 else F32)
        elif mut == "meta":
            vlist[i] = t.to("meta")
        elif mut == "element":
            vlist[i] = t.tolist()
        else:
            vlist[i] = _layout(d, t, ("transposed", "strided", "expanded"))
    elif mut == "single" and len(vlist) == 1:  # a bare tensor for a one-tensor vector
        lists[victim] = vlist[0]
    elif mut == "arg":
        lists[victim] = d(st.sampled_from([3.0, "x", None]))
        if lists[victim] is None:
            if victim == "z":
                lists.pop("z")
                z_mode = "none"
            else:
                lists[victim] = 3.0
    elif mut in ("alias", "overlap", "disjoint", "read_overlap") and k:
        # two slots (argument, index) made to share one buffer
        slots = [(nm, i) for nm in args for i in range(k)]
        if mut == "read_overlap" and mutated:
            a = (d(st.sampled_from(list(mutated))), d(st.integers(0, k - 1)))
            b = (d(st.sampled_from([r for r in read if r in lists] or list(mutated))), d(st.integers(0, k - 1)))
        else:
            a, b = d(st.sampled_from(slots)), d(st.sampled_from(slots))
        ta, tb = lists[a[0]][a[1]], lists[b[0]][b[1]]
        na, nb = ta.numel(), tb.numel()
        lists[a[0]] = list(lists[a[0]])
        lists[b[0]] = list(lists[b[0]])
        if mut == "alias" and ta.shape == tb.shape:
            lists[b[0]][b[1]] = ta
        else:
            off = d(st.integers(0, max(0, na - 1))) if mut != "disjoint" else na + d(st.integers(0, 2))
            buf = torch.zeros(max(na, off + nb) + 1, dtype=dtype)
            va = buf[:na].view(ta.shape)
            va.copy_(ta)
            vb = buf[off:off + nb].view(tb.shape)
            vb.copy_(tb)  # (where they overlap, b's values win in both)
            lists[a[0]][a[1]] = va
            lists[b[0]][b[1]] = vb
    if z_mode == "same":  # linked after the mutations: the very same list object
        lists["z" if op == "axpy_dot_" else "y"] = lists["y" if op == "axpy_dot_" else "x"]
    elif op == "axpy_dot_" and z_mode == "given" and isinstance(lists.get("z"), list) \
            and isinstance(lists.get("y"), list) and len(lists["z"]) == len(lists["y"]) and all(
                torch.is_tensor(a) and torch.is_tensor(b) and (a is b or (a.numel() and a.data_ptr() == b.data_ptr()
                                                                          and a.stride() == b.stride()))
                for a, b in zip(lists["z"], lists["y"])):
        z_mode = "aliased"  # every z_i is y_i: the self dot product <y, y>
    if op == "dot" and isinstance(lists.get("x"), list) and isinstance(lists.get("y"), list) \
            and len(lists["x"]) == len(lists["y"]) and all(a is b for a, b in zip(lists["x"], lists["y"])):
        z_mode = "same"
    reasons = _solver_oracle(op, lists, z_mode, mutated)
    # the scalar
    sval = None
    if scalar:
        sk = d(st.sampled_from(["float"] * 5 + ["int", "tensor", "nan", "inf", "tensor2", "complex", "str", "meta",
                                               "complex_tensor"]))
        sval = {"float": d(st.floats(-2, 2)), "int": 2, "tensor": torch.tensor(0.25, dtype=F64), "nan": NAN,
                "inf": INF, "tensor2": torch.ones(2), "complex": 1j, "str": "0.5",
                "meta": torch.tensor(0.5, device="meta"), "complex_tensor": torch.tensor(0.5 + 1j)}[sk]
        if sk in ("tensor2", "complex", "str", "meta", "complex_tensor"):
            reasons.append(scalar)
    listed = {nm: ([v] if torch.is_tensor(v) else v) for nm, v in lists.items()}
    before = {nm: [t.clone() if torch.is_tensor(t) and t.device.type != "meta" else None for t in v]
              for nm, v in listed.items() if isinstance(v, list)}

    def call():
        L = lists
        if op == "neumann_step_":
            return sv.neumann_step_(L["c"], L["p"], L["h"], sval)
        if op == "axpy_dot_":
            return sv.axpy_dot_(L["y"], sval, L["x"], L.get("z"))
        if op == "cg_update_":
            return sv.cg_update_(L["x"], L["r"], L["d"], L["q"], sval)
        if op == "dot":
            return sv.dot(L["x"], L["y"])
        return sv.norm(L["x"])

    out, err = run_case(cat, call, reasons)
    if err is not None:  # nothing was written before the error
        for nm, ts in before.items():
            for t0, t in zip(ts, listed[nm]):
                if t0 is not None and torch.is_tensor(t) and t.device.type != "meta":
                    assert _same(t0, t), f"{cat}: {nm} was modified by a call that raised"
        return
    _check_solver_result(cat, op, before, listed, sval, out, z_mode)


def _same(a, b) -> bool:
    """Equal values, NaN equal to NaN (any dtype)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _check_solver_result(cat, op, before, after, sval, out, z_mode):
    first = next(iter(before.values()))
    dtype = first[0].dtype if first else F32
    acc = F64 if dtype == F64 else F32
    eps = EPS[dtype]
    a = None
    if sval is not None:  # the kernels see the scalar in the accumulation dtype
        a = float((sval if torch.is_tensor(sval) else torch.tensor(float(sval), dtype=F64)).to(acc))
    B = {nm: [t.to(F64) for t in ts] for nm, ts in before.items()}
    A = {nm: [t.to(F64) for t in ts] for nm, ts in after.items()}

    def upd(name, want, mag):
        for i, (w, got) in enumerate(zip(want, A[name])):
            # + the dtype's smallest normal: a product below it underflows (to a subnormal or 0) when the
            # result is stored in ``dtype``, an error no kernel can avoid
            _close(cat, got, w, 4 * eps * torch.nan_to_num(mag[i], posinf=0.0) + torch.finfo(dtype).tiny, 4 * eps,
                   f"{name}[{i}]")

    def dot_check(xs, ys):
        want = sum(((x * y).sum() for x, y in zip(xs, ys)), torch.zeros((), dtype=F64))
        absum = sum(((x * y).abs().sum() for x, y in zip(xs, ys)), torch.zeros((), dtype=F64))
        assert out.dtype == acc and out.shape == (), f"{cat}: result {out.dtype} {tuple(out.shape)}"
        if not bool(torch.isfinite(absum)) or float(absum) > torch.finfo(acc).max / 8:
            COUNTS[cat + " (dot beyond the accumulator range)"] += 1
            return  # overflow of the accumulation dtype: no value promised
        n = sum(x.numel() for x in xs)
        want = want.to(acc)  # underflow (and overflow) of the accumulation dtype
        _close(cat, out, want, 4 * EPS[acc] * (n + 2) * float(absum) + (n + 2) * torch.finfo(acc).tiny, 0.0, "dot")

    if op == "neumann_step_":
        c = [c - a * h for c, h in zip(B["c"], B["h"])]
        upd("c", c, [bc.abs() + abs(a) * h.abs() for bc, h in zip(B["c"], B["h"])])
        upd("p", [p + ci for p, ci in zip(B["p"], c)], [p.abs() + ci.abs() * 2 for p, ci in zip(B["p"], c)])
        assert out is None
    elif op == "axpy_dot_":
        y = [y + a * x for y, x in zip(B["y"], B["x"])]
        upd("y", y, [by.abs() + abs(a) * x.abs() for by, x in zip(B["y"], B["x"])])
        dot_check(A["y"], A["y"] if z_mode in ("none", "same", "aliased") else B["z"])
    elif op == "cg_update_":
        x = [x + a * dd for x, dd in zip(B["x"], B["d"])]
        r = [r - a * q for r, q in zip(B["r"], B["q"])]
        upd("x", x, [bx.abs() + abs(a) * dd.abs() for bx, dd in zip(B["x"], B["d"])])
        upd("r", r, [br.abs() + abs(a) * q.abs() for br, q in zip(B["r"], B["q"])])
        dot_check(A["r"], A["r"])
    elif op == "dot":
        dot_check(B["x"], B["y"])
    else:
        want = sum(((x * x).sum() for x in B["x"]), torch.zeros((), dtype=F64))
        if bool(torch.isfinite(want)) and float(want) < torch.finfo(acc).max / 8:
            n = sum(x.numel() for x in B["x"])
            _close(cat, out, want.to(acc).sqrt(), 4 * EPS[acc] * (n + 2) * float(want.sqrt())
                   + ((n + 2) * torch.finfo(acc).tiny) ** 0.5, 0.0, "norm")


# --------------------------------------------------------------------------- commentary modules

C = 3
IMG = (1, 16, 16)


def _modules():
    torch.manual_seed(0)
    mods = {
        "ExampleWeighting": ExampleWeighting.reference(IMG, C, use_label=True, reduction="normalized"),
        "TabularWeighting": TabularWeighting(12, num_bins=3, num_classes=C, reduction="mean"),
        "Blending": Blending(C),
        "Blending.random": Blending(C, policy="random"),
        "Blending.mixup": Blending(C, policy="mixup", alpha=0.4),
        "AttentionMask": AttentionMask(1, num_classes=C, width=2, background="other"),
        "AttentionMask.blur": AttentionMask(1, num_classes=C, width=2, background="blur", b=0.1),
    }
    with torch.no_grad():
        mods["Blending"].phi.copy_(torch.randn(C, C))
        mods["TabularWeighting"].logits.copy_(torch.randn(12, 3))
    for m in mods.values():
        m.eval()  # BatchNorm on batch statistics would reject batches of one example
    return mods


MODULES = _modules()


def _student(x: torch.Tensor, classes: int) -> torch.Tensor:
    """A fixed linear student in float64 for any feature shape."""
    f = x.flatten(1).to(F64)
    W = torch.randn(f.shape[1], classes, dtype=F64, generator=torch.Generator().manual_seed(f.shape[1])) * 0.3
    return f @ W


def _ref_loss(logits, prep):
    rows = ref_rows(logits, prep.target.long(), None if prep.target_b is None else prep.target_b.long(),
                    None if prep.lam is None else prep.lam.to(F64), -100)
    if prep.weight is None:
        return rows.sum() if prep.reduction == "sum" else rows.mean()
    w = prep.weight.to(F64)
    s = (w * rows).sum()
    return {"sum": s, "mean": s / rows.numel(), "normalized": s / w.sum().clamp_min(torch.finfo(F64).tiny)}[prep.reduction]


@settings(max_examples=examples(1000), **FUZZ)
@given(st.data())
def test_fuzz_commentary_modules(data):
    d = data.draw
    name = d(st.sampled_from(sorted(MODULES)), label="module")
    mod = MODULES[name]
    cat = f"commentary.{name}"
    reasons: list[str] = []
    n = d(st.sampled_from([3, 2, 1, 4, 5, 0]), label="n")
    needs_image = name.startswith(("ExampleWeighting", "AttentionMask"))
    skind = d(st.sampled_from(["image"] * 8 + ["flat", "small_image", "vector", "two_channels", "empty_feature"]))
    shape = {"image": (n,) + IMG, "flat": (n, 7), "vector": (n,), "small_image": (n, 1, 5, 3),
             "two_channels": (n, 2, 4, 4), "empty_feature": (n, 1, 0, 4)}[skind]
    xdt = d(st.sampled_from([F32] * 12 + [F64, torch.float16, torch.int64, torch.bool, torch.complex64]))
    special = rare(d, 4)
    x = _cast(_values(d, shape, special), xdt)
    x = _layout(d, x, ("contig", "contig", "transposed", "offset"))
    x = _meta(d, x, 0.03)
    if len(shape) < 2 or not (xdt.is_floating_point):
        reasons.append("x")
    elif n == 0:
        reasons.append("empty batch")
    elif 0 in shape:
        reasons.append("x has no features")
    elif x.device.type == "meta":
        reasons.append("x")
    # labels
    gy = torch.Generator().manual_seed(d(st.integers(0, 10**6)))
    y = torch.randint(0, C, (n,), generator=gy)
    ykind = d(st.sampled_from(["good"] * 12 + ["dtype"] * 2 + ["out", "neg", "bool", "shape", "meta", "none"]))
    if ykind in ("out", "neg") and n:
        y[d(st.integers(0, n - 1))] = C + 2 if ykind == "out" else -1
        reasons.append("label")
    elif ykind == "dtype":
        y = y.to(d(st.sampled_from([torch.int32, torch.uint8, F32])))
        if y.is_floating_point():
            reasons.append("y")
    elif ykind == "bool":
        y = y.bool()
        reasons.append("y")
    elif ykind == "shape":
        y = y[:, None] if d(st.booleans()) else torch.cat([y, y[:1]]) if n else torch.zeros(1, dtype=torch.long)
        reasons.append("y")
    elif ykind == "meta":
        y = y.to("meta")
        reasons.append("y")
    elif ykind == "none":
        y = y.tolist()
        reasons.append("y")
    # example indices (TabularWeighting needs them)
    index = None
    ikind = d(st.sampled_from(["good"] * 10 + ["missing", "out", "neg", "float", "bool", "shape", "meta"]))
    if name == "TabularWeighting" or rare(d, 3):
        index = torch.randint(0, 12, (n,), generator=gy)
        if ikind == "missing":
            index = None
            if name == "TabularWeighting":
                reasons.append("index")
        elif ikind in ("out", "neg") and n:
            index[d(st.integers(0, n - 1))] = 12 if ikind == "out" else -5
            if name == "TabularWeighting":
                reasons.append("index")
        elif ikind in ("float", "bool", "shape", "meta"):
            index = {"float": index.float(), "bool": index.bool(), "shape": index[:, None], "meta": index.to("meta")}[ikind]
            reasons.append("index")
    # training progress
    pkind = d(st.sampled_from(["none"] * 4 + ["float"] * 4 + ["tensor"] * 2 + ["out", "nan", "inf", "shape", "str",
                                                                            "complex"]))
    progress = {"none": None, "float": d(st.floats(0, 1)), "tensor": torch.rand(n), "nan": NAN, "inf": -INF,
                "shape": torch.rand(n + 1), "str": "half", "complex": 0.5j, "out": 7.5}[pkind]
    if pkind in ("nan", "inf", "shape", "str", "complex"):
        reasons.append("progress")
    # module-specific contracts
    if needs_image and xdt.is_floating_point and len(shape) >= 2:
        want_shape = IMG if name == "ExampleWeighting" else None
        if name == "ExampleWeighting" and tuple(shape[1:]) != want_shape:
            reasons.append("images")
        if name.startswith("AttentionMask") and (len(shape) != 4 or shape[1] != 1):
            reasons.append("images")
        if xdt != F32:
            reasons.append("dtype")
    classes = C if not rare(d, 4) else d(st.sampled_from([1, 2, 5]))
    if classes < C and torch.is_tensor(y) and y.dim() == 1 and y.numel() and not y.is_floating_point() \
            and y.device.type != "meta" \
            and int(y.long().max()) >= classes and "label" not in reasons:
        reasons.append("label")
    gen = torch.Generator().manual_seed(1)

    def pipeline():
        batch = mod.prepare(x, y, index=index, progress=progress, generator=gen)
        prep = mod(batch)
        return batch, prep, commentary_loss(_student(prep.x, classes), prep)

    out, err = run_case(cat, pipeline, reasons)
    if err is not None:
        return
    batch, prep, loss = out
    # the fused path (kernels) against plain PyTorch and the float64 cross-entropy
    with plain_ops():
        prep_r = mod(batch)
    want = _ref_loss(_student(prep_r.x, classes), prep_r)
    assert loss.dtype == F64 and loss.shape == ()
    assert torch.equal(prep.target, prep_r.target)
    if prep.weight is not None:
        torch.testing.assert_close(prep.weight, prep_r.weight, rtol=0, atol=0, equal_nan=True)
    eps = torch.finfo(x.dtype).eps
    mag = float(x.to(F64).abs().nan_to_num(posinf=0.0).max()) if x.numel() else 0.0
    if not bool(torch.isfinite(x).all()):
        # inf in x: the fused blend's documented formula xb + m (x_a - xb) gives NaN where plain
        # m x_a + (1 - m) xb gives inf; the loss is not finite either way
        assert not bool(torch.isfinite(loss)) and not bool(torch.isfinite(want)), f"{cat}: {loss} vs {want}"
    else:
        _close(cat, loss, want, 64 * eps * (1 + mag) * (1 + abs(float(want.nan_to_num()))), 64 * eps, "training loss")
    if name == "Blending":  # lam = 1 - sigmoid(phi[y_i, y_j]) / 2, partner y_j = y[perm]
        yl = batch["y"]
        assert torch.equal(prep.target_b, yl[batch["perm"]])
        torch.testing.assert_close(prep.lam, 1 - 0.5 * torch.sigmoid(mod.phi[yl, yl[batch["perm"]]]), equal_nan=True)
    if name == "TabularWeighting":
        b = (batch["progress"].clamp(0, 1) * 3).long().clamp_max(2)
        torch.testing.assert_close(prep.weight, torch.sigmoid(mod.logits[batch["index"], b]), equal_nan=True)


# --------------------------------------------------------------------------- commentary files

FILE_DATA = (torch.randn(10, *IMG, generator=torch.Generator().manual_seed(0)), torch.arange(10) % C)


def _valid_files(tmp):
    out = {}
    for name, mod in (("Blending", Blending(C)),
                      ("TabularWeighting", TabularWeighting(10, num_bins=2, num_classes=C, reduction="sum")),
                      ("ExampleWeighting", ExampleWeighting.reference(IMG, C, reduction="sum")),
                      ("AttentionMask", AttentionMask(1, num_classes=C, width=2))):
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape))
        path = files.save_commentary(os.path.join(tmp, name + ".commentary"), mod, data=FILE_DATA,
                                     learned_with={"algorithm": "ift", "steps": 3})
        out[name] = (mod, open(path, "rb").read())
    return out


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    return _valid_files(str(tmp_path_factory.mktemp("fuzz_files")))


def _split(blob: bytes):
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header: dict, data: bytes, pad: bool = True) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


class _Spy:
    """Records whether the loader read tensor data or built a module for real."""

    def __init__(self, monkeypatch):
        import safetensors.torch as stt

        self.loads = 0
        self.builds = 0
        real_load, real_build = stt.load_file, files._build

        def load_file(*a, **k):
            self.loads += 1
            return real_load(*a, **k)

        def build(path, cls, cfg, *, meta_device):
            self.builds += not meta_device
            return real_build(path, cls, cfg, meta_device=meta_device)

        monkeypatch.setattr(stt, "load_file", load_file)
        monkeypatch.setattr(files, "_build", build)


@pytest.fixture
def spy(monkeypatch):
    return _Spy(monkeypatch)


def _meta_of(header):
    return json.loads(header["__metadata__"][files.META_KEY])


def _set_meta(header, meta):
    header = dict(header)
    header["__metadata__"] = {files.META_KEY: json.dumps(meta)}
    return header


HUGE = 2**40

# structured mutations of a valid file: (name, function(header, data) -> bytes, expected outcome)
# "refuse": CommentaryFileError; "mismatch": CommentaryMismatchError; "refuse_early": refused
# without reading tensor data or building a module; "ok": loads, with the file's values.


def _first(header):
    return sorted(k for k in header if k != "__metadata__")[0]


def _mut_tensor(field, value):
    def f(h, data):
        h = json.loads(json.dumps(h))
        h[_first(h)][field] = value
        return _join(h, data)
    return f


def _mut_meta(fn):
    def f(h, data):
        m = _meta_of(h)
        fn(m)
        return _join(_set_meta(h, m), data)
    return f


def _mut_config(key, value):
    def g(m):
        m["config"][key] = value
    return _mut_meta(g)


def _set(key, value):
    def g(m):
        m[key] = value
    return g


def _del(key):
    def g(m):
        m.pop(key, None)
    return g


def _extra_tensor(h, data):
    h = json.loads(json.dumps(h))
    k = _first(h)
    h["evil"] = dict(h[k])  # shares the bytes of another tensor
    return _join(h, data)


def _huge_meta_string(h, data):
    h = dict(h)
    h["__metadata__"] = {files.META_KEY: "[" * 100000 + "]" * 100000}
    return _join(h, data)


def _pickle_payload(h, data):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/commentaries_fuzz_pwned",))
    return pickle.dumps({"phi": Evil()})


def _torch_save(h, data):
    import io

    buf = io.BytesIO()
    torch.save({"phi": torch.zeros(3, 3)}, buf)
    return buf.getvalue()


MUTATIONS = [
    ("shape_huge", _mut_tensor("shape", [HUGE, HUGE]), "refuse_early"),
    ("shape_negative", _mut_tensor("shape", [-1, 3]), "refuse_early"),
    ("shape_float", _mut_tensor("shape", [3.0, 3]), "refuse_early"),
    ("shape_bool", _mut_tensor("shape", [True]), "refuse_early"),
    ("shape_many_dims", _mut_tensor("shape", [1] * 40), "refuse_early"),
    ("shape_wrong_size", _mut_tensor("shape", [2, 2]), "refuse_early"),
    ("dtype_unknown", _mut_tensor("dtype", "F8_E4M3"), "refuse_early"),
    ("dtype_complex", _mut_tensor("dtype", "C64"), "refuse_early"),
    ("dtype_object", _mut_tensor("dtype", {"__class__": "os.system"}), "refuse_early"),
    ("dtype_other_width", _mut_tensor("dtype", "F64"), "refuse_early"),
    ("offsets_out_of_file", _mut_tensor("data_offsets", [0, HUGE]), "refuse_early"),
    ("offsets_negative", _mut_tensor("data_offsets", [-36, 0]), "refuse_early"),
    ("offsets_reversed", _mut_tensor("data_offsets", [36, 0]), "refuse_early"),
    ("offsets_three", _mut_tensor("data_offsets", [0, 1, 2]), "refuse_early"),
    ("entry_extra_key", _mut_tensor("code", "import os"), "refuse_early"),
    ("tensor_shares_bytes", _extra_tensor, "refuse_early"),
    ("length_prefix_huge", lambda h, data: (2**63).to_bytes(8, "little") + _join(h, data)[8:], "refuse_early"),
    ("length_prefix_zero", lambda h, data: (0).to_bytes(8, "little") + _join(h, data)[8:], "refuse_early"),
    ("length_prefix_past_end", lambda h, data: (len(_join(h, data)) ).to_bytes(8, "little") + _join(h, data)[8:],
     "refuse_early"),
    ("header_not_object", lambda h, data: _join([1, 2, 3], data), "refuse_early"),
    ("header_not_utf8", lambda h, data: (8).to_bytes(8, "little") + b"\xff\xfe{}    " + data, "refuse_early"),
    ("duplicate_keys", lambda h, data: (lambda b: len(b).to_bytes(8, "little") + b + data)(
        json.dumps(h).replace('"__metadata__"', '"%s":%s,"__metadata__"' % (_first(h), json.dumps(h[_first(h)])),
                              1).encode()), "refuse_early"),
    ("appended_bytes", lambda h, data: _join(h, data) + b"\x00" * 16, "refuse_early"),
    ("truncated_data", lambda h, data: _join(h, data[:-4]), "refuse_early"),
    ("metadata_missing", lambda h, data: _join({k: v for k, v in h.items() if k != "__metadata__"}, data),
     "refuse_early"),
    ("metadata_unknown_key", lambda h, data: _join({**h, "__metadata__": {**h["__metadata__"], "loader": "pickle"}},
                                                   data), "refuse_early"),
    ("metadata_not_strings", lambda h, data: _join({**h, "__metadata__": {files.META_KEY: {"a": 1}}}, data),
     "refuse_early"),
    ("metadata_not_json", lambda h, data: _join({**h, "__metadata__": {files.META_KEY: "{not json"}}, data),
     "refuse_early"),
    ("metadata_deep_nesting", _huge_meta_string, "refuse_early"),
    ("metadata_list", lambda h, data: _join({**h, "__metadata__": {files.META_KEY: "[1, 2]"}}, data), "refuse_early"),
    ("metadata_nan", lambda h, data: _join({**h, "__metadata__": {files.META_KEY: h["__metadata__"][files.META_KEY]
                                                                  .replace('"num_classes": 3', '"num_classes": NaN')}},
                                           data), "refuse_early"),
    ("metadata_huge_int", lambda h, data: _join({**h, "__metadata__": {files.META_KEY: h["__metadata__"][files.META_KEY]
                                                                       .replace('"num_classes": 3',
                                                                                '"num_classes": 1' + "0" * 5000)}},
                                                data), "refuse_early"),
    ("format_other", _mut_meta(_set("format", "pickle")), "refuse_early"),
    ("meta_unknown_key", _mut_meta(_set("__reduce__", "os.system")), "refuse_early"),
    ("class_unknown", _mut_meta(_set("class", "os.system")), "refuse_early"),
    ("class_builtin", _mut_meta(_set("class", "__import__")), "refuse_early"),
    ("class_not_string", _mut_meta(_set("class", ["Blending"])), "refuse_early"),
    ("num_classes_other", _mut_meta(_set("num_classes", 5)), "mismatch"),
    ("num_classes_negative", _mut_meta(_set("num_classes", -1)), "refuse_early"),
    ("num_classes_string", _mut_meta(_set("num_classes", "3")), "refuse_early"),
    ("num_classes_bool", _mut_meta(_set("num_classes", True)), "refuse_early"),
    ("num_classes_float", _mut_meta(_set("num_classes", 1e308)), "refuse_early"),
    ("input_shape_huge", _mut_meta(_set("input_shape", [HUGE, HUGE])), "refuse_early"),
    ("input_shape_bad", _mut_meta(_set("input_shape", "1x16x16")), "refuse_early"),
    ("data_fingerprint_other", _mut_meta(lambda m: m["data"].update(sha256="0" * 64)), "mismatch"),
    ("data_fingerprint_bad", _mut_meta(_set("data", {"sha256": 5})), "refuse_early"),
    ("tensors_spec_other_shape", _mut_meta(lambda m: m["tensors"][sorted(m["tensors"])[0]].update(shape=[7])),
     "refuse_early"),
    ("tensors_spec_missing", _mut_meta(lambda m: m["tensors"].pop(sorted(m["tensors"])[0])), "refuse_early"),
    ("tensors_spec_bad", _mut_meta(_set("tensors", [1])), "refuse_early"),
    ("config_not_object", _mut_meta(_set("config", "Blending(3)")), "refuse_early"),
    ("config_unknown_key", _mut_config("command", "touch pwned"), "refuse_early"),
    ("config_nested", _mut_config("num_classes", {"__class__": "int"}), "refuse_early"),
    ("config_huge_classes", _mut_config("num_classes", 10**6), "early"),
    ("config_huge_examples", _mut_config("num_examples", 10**12), "early"),
    ("config_huge_width", _mut_config("width", 10**5), "early"),
    ("config_huge_image", _mut_config("in_shape", [1, 10**6, 10**6]), "early"),
    ("config_bad_value", _mut_config("reduction", "explode"), "refuse_early"),
    ("config_negative", _mut_config("num_bins", -3), "refuse_early"),
    ("learned_with_edit", _mut_meta(lambda m: m["learned_with"].update(steps=99)), "ok"),
    ("config_value_edit", _mut_meta(lambda m: m["config"].update(init=3.5)), "refuse"),  # content_sha256
    ("created_edit", _mut_meta(_set("created", "yesterday")), "ok"),
    ("meta_fields_removed", _mut_meta(lambda m: [m.pop(k) for k in ("created", "library_version", "extra")]), "ok"),
    ("header_unpadded", lambda h, data: _join(h, data, pad=False), "ok"),
    ("pickle_payload", _pickle_payload, "refuse_early"),
    ("torch_save_zip", _torch_save, "refuse_early"),
    ("empty_file", lambda h, data: b"", "refuse_early"),
]
CONFIG_KEYS = {"config_huge_classes": ("Blending", "TabularWeighting", "ExampleWeighting", "AttentionMask"),
               "config_huge_examples": ("TabularWeighting",), "config_huge_width": ("AttentionMask",),
               "config_huge_image": ("ExampleWeighting",), "config_negative": ("TabularWeighting",),
               "config_bad_value": ("Blending", "TabularWeighting", "ExampleWeighting")}


def _check_load(cat, path, blob, expected, spy, data=FILE_DATA):
    """Load ``blob`` from ``path``; ``expected`` the outcome class (None: either is fine)."""
    with open(path, "wb") as f:
        f.write(blob)
    loads0, builds0 = spy.loads, spy.builds
    COUNTS[cat] += 1
    try:
        mod = load_commentary(path, data=data)
    except (CommentaryFileError, CommentaryMismatchError) as e:
        assert expected != "ok", f"{cat}: a valid file was refused: {e}"
        if expected == "mismatch":
            assert isinstance(e, CommentaryMismatchError), f"{cat}: expected a mismatch, got {e!r}"
        if expected in ("refuse", "refuse_early"):
            assert isinstance(e, CommentaryFileError), f"{cat}: expected CommentaryFileError, got {e!r}"
        if expected in ("refuse_early", "early"):
            assert spy.loads == loads0 and spy.builds == builds0, \
                f"{cat}: read tensor data or built the module before refusing ({e})"
        OUTCOMES[cat, "error"] += 1
        return None
    assert expected in (None, "ok"), f"{cat}: a bad file was loaded (expected {expected})"
    # a loaded file gives exactly what it holds
    from safetensors.torch import load as st_load

    held = st_load(blob)
    sd = mod.state_dict()
    assert set(held) == set(sd), f"{cat}: loaded {sorted(sd)} from a file holding {sorted(held)}"
    for k, v in held.items():
        assert torch.equal(sd[k], v.to(sd[k].dtype)), f"{cat}: tensor {k} differs from the file"
    OUTCOMES[cat, "ok"] += 1
    return mod


@settings(max_examples=examples(1000), **FUZZ)
@given(data=st.data())
def test_fuzz_load_commentary(valid_files, tmp_path, spy, data):
    d = data.draw
    name = d(st.sampled_from(sorted(valid_files)), label="file")
    mod, blob = valid_files[name]
    header, body = _split(blob)
    path = str(tmp_path / "f.commentary")
    kind = d(st.sampled_from(["structured"] * 6 + ["random_bytes", "truncated", "flip_header", "flip_data",
                                                   "wrong_data", "wrong_classes", "wrong_model"]), label="kind")
    if kind == "structured":
        mname, fn, expected = d(st.sampled_from(MUTATIONS), label="mutation")
        if mname in CONFIG_KEYS and name not in CONFIG_KEYS[mname]:
            return
        if os.path.exists("/tmp/commentaries_fuzz_pwned"):
            os.unlink("/tmp/commentaries_fuzz_pwned")
        _check_load(f"files.{mname}", path, fn(header, body), expected, spy)
        assert not os.path.exists("/tmp/commentaries_fuzz_pwned"), "code from the file ran"
        if expected != "ok":  # read_metadata refuses the same files (when the header is at fault)
            try:
                read_metadata(path)
            except (CommentaryFileError,):
                pass
        return
    if kind == "random_bytes":
        b = d(st.binary(min_size=0, max_size=300))
        if d(st.booleans()) and len(b) >= 8:  # a plausible length prefix
            b = min(len(b) - 8, d(st.integers(0, 300))).to_bytes(8, "little") + b[8:]
        _check_load("files.random_bytes", path, b, "refuse_early", spy)
    elif kind == "truncated":
        cut = d(st.integers(0, len(blob) - 1))
        _check_load("files.truncated", path, blob[:cut], "refuse_early", spy)
    elif kind == "flip_header":
        hlen = 8 + int.from_bytes(blob[:8], "little")
        b = bytearray(blob)
        for _ in range(d(st.integers(1, 3))):
            b[d(st.integers(0, hlen - 1))] ^= 1 << d(st.integers(0, 7))
        _check_load("files.flip_header", path, bytes(b), None, spy)  # refused, or loads what it holds
    elif kind == "flip_data":
        hlen = 8 + int.from_bytes(blob[:8], "little")
        b = bytearray(blob)
        if len(b) > hlen:
            b[d(st.integers(hlen, len(b) - 1))] ^= 1 << d(st.integers(0, 7))
        # a changed value: refused (content_sha256), never loaded as another commentary
        _check_load("files.flip_data", path, bytes(b), "refuse" if len(b) > hlen else "ok", spy)
    elif kind == "wrong_data":
        x, y = FILE_DATA
        other = d(st.sampled_from(["order", "labels", "size", "dtype"]))
        data2 = {"order": (x.flip(0), y.flip(0)), "labels": (x, (y + 1) % C), "size": (x[:-1], y[:-1]),
                 "dtype": (x.double(), y)}[other]
        _check_load("files.wrong_dataset", path, blob, "mismatch", spy, data=data2)
    elif kind == "wrong_classes":
        with open(path, "wb") as f:
            f.write(blob)
        COUNTS["files.wrong_class_count"] += 1
        with pytest.raises(CommentaryMismatchError, match="num_classes"):
            load_commentary(path, data=FILE_DATA, num_classes=C + d(st.integers(1, 5)))
        with pytest.raises(CommentaryMismatchError, match="num_classes"):
            load_commentary(path, commentary=type(mod).from_config({**mod.config(), "num_classes": C + 1})
                            if name != "TabularWeighting" else TabularWeighting(10, num_bins=2, num_classes=C + 1))
    else:
        with open(path, "wb") as f:
            f.write(blob)
        COUNTS["files.wrong_model"] += 1
        with pytest.raises(CommentaryMismatchError, match="model: it outputs"):
            load_commentary(path, model=nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMG), C + 2)))


def test_load_commentary_regressions(tmp_path, spy):
    """Hand-made malicious files: huge configs are refused before any allocation."""
    from safetensors.torch import save_file

    p = str(tmp_path / "evil.commentary")
    for cls, cfg, t in [(Blending, {"num_classes": 10**6}, {"phi": torch.zeros(3, 3)}),
                        (TabularWeighting, {"num_examples": 10**12}, {"logits": torch.zeros(3, 1)}),
                        (AttentionMask, {"in_channels": 1, "width": 10**5}, {"x": torch.zeros(1)}),
                        (ExampleWeighting, {"net": "teacher", "in_shape": [1, 10**6, 10**6]}, {"x": torch.zeros(1)})]:
        meta = {"format": files.FORMAT, "kind": cls.kind, "class": cls.__name__, "config": cfg}
        save_file(t, p, metadata={files.META_KEY: json.dumps(meta)})
        with pytest.raises(CommentaryMismatchError, match="in the module|missing from the file"):
            load_commentary(p)
        assert spy.builds == 0 and spy.loads == 0
    meta = {"format": files.FORMAT, "kind": "blending", "class": "Blending", "config": {"num_classes": 3}}
    save_file({"phi": torch.full((3, 3), NAN)}, p, metadata={files.META_KEY: json.dumps(meta)})
    with pytest.raises(CommentaryFileError, match="'phi' holds NaN"):
        load_commentary(p)
    b = Blending(3)
    with torch.no_grad():
        b.phi[0, 0] = INF
    with pytest.raises(ValueError, match="'phi' of the commentary holds NaN or Inf"):
        files.save_commentary(tmp_path / "inf.commentary", b)
    COUNTS["files.regressions"] += 5


# --------------------------------------------------------------------------- regressions found by the fuzzing


def test_blended_target_b_ignore_index_is_refused():
    """target_b == ignore_index on a row that is not ignored made the C++ kernels read (forward)
    and write (backward) z[i, -100]: out of bounds."""
    z = torch.randn(3, 4, dtype=F64, requires_grad=True)
    a, b = torch.tensor([0, 1, 2]), torch.tensor([1, -100, 3])
    for fn in (lambda: ce.blended_cross_entropy(z, a, b, 0.5, reduction="none"),
               lambda: ce.per_example_cross_entropy(z, a, b, 0.5),
               lambda: ce.cross_entropy_jvp(z, a, torch.ones(3, 4, dtype=F64), b, 0.5)):
        with pytest.raises(IndexError, match="target_b holds -100"):
            fn()
    # on an ignored row target_b is never read: allowed
    a2 = torch.tensor([0, -100, 2])
    out = ce.blended_cross_entropy(z, a2, b, 0.5, reduction="none")
    assert out[1] == 0 and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="ignore_index"):
        ce.weighted_cross_entropy(z, a, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        ce.weighted_cross_entropy(z, a, ignore_index=2**70)


def test_solver_overlapping_views_are_refused():
    """Partly overlapping views (not the same data_ptr) of one buffer passed the alias check."""
    buf = torch.zeros(10)
    c, p, h = buf[0:6], buf[3:9], torch.ones(6)
    with pytest.raises(ValueError, match=r"c\[0\] shares memory with p\[0\]|p\[0\] shares memory with c\[0\]"):
        sv.neumann_step_([c], [p], [h], 0.5)
    with pytest.raises(ValueError, match="shares memory"):  # a read vector overlapping an updated one
        sv.cg_update_([buf[0:4]], [torch.zeros(4)], [buf[2:6]], [torch.zeros(4)], 1.0)
    y = torch.zeros(8)
    with pytest.raises(ValueError, match="shares memory"):
        sv.axpy_dot_([y[:4], y[4:]], 1.0, [torch.ones(4), torch.ones(4)], [y[4:], torch.ones(4)])
    # disjoint views of one buffer are fine
    sv.neumann_step_([buf[0:5]], [buf[5:10]], [torch.ones(5)], 1.0)
    assert torch.equal(buf, torch.tensor([-1.0] * 5 + [-1.0] * 5))
    with pytest.raises(TypeError, match="a must be"):
        sv.axpy_dot_([torch.zeros(2)], "0.5", [torch.ones(2)])
    with pytest.raises(TypeError, match="a must be real"):
        sv.axpy_dot_([torch.zeros(2)], torch.tensor(1j), [torch.ones(2)])


def test_batch_validation_regressions():
    tab = TabularWeighting(5, num_classes=3)
    x = torch.randn(2, 4)
    with pytest.raises(BatchError, match="index must hold integer"):
        tab.prepare(x, torch.tensor([0, 1]), index=torch.tensor([True, False]))
    with pytest.raises(BatchError, match="y is on meta"):
        tab.prepare(x, torch.tensor([0, 1], device="meta"), index=torch.tensor([0, 1]))
    with pytest.raises(BatchError, match="no features"):
        tab.prepare(torch.randn(2, 0), torch.tensor([0, 1]), index=torch.tensor([0, 1]))
    with pytest.raises(BatchError, match="progress"):
        tab.prepare(x, torch.tensor([0, 1]), index=torch.tensor([0, 1]), progress="half")
    ew = ExampleWeighting.reference(IMG, 3)
    with pytest.raises(BatchError, match="x has dtype torch.float64 but the network's parameters are torch.float32"):
        ew(ew.prepare(torch.randn(2, *IMG, dtype=F64), torch.tensor([0, 1])))
    am = AttentionMask(1, width=2)
    with pytest.raises(BatchError, match="x has dtype torch.float64"):
        am.prepare(torch.randn(2, 1, 4, 4, dtype=F64), torch.tensor([0, 1]))
    b = Blending(3)
    batch = b.prepare(torch.randn(2, 4, dtype=torch.float16), torch.tensor([0, 1]), generator=torch.Generator())
    assert b(batch).x.dtype == torch.float16  # the fused blend has no CPU half kernel: plain PyTorch
    prep = b(b.prepare(torch.randn(3, 4), torch.tensor([0, 1, 2]), generator=torch.Generator()))
    with pytest.raises(BatchError, match="out of range for logits with 2 classes"):
        commentary_loss(torch.randn(3, 2), prep)


# --------------------------------------------------------------------------- engine, wrapper, learn


def _ift_problem(nan_val=False, nan_train=False):
    from commentaries_ext.commentary import train_loss_fn, val_loss_fn
    from commentaries_ext.engine import FunctionalModule

    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    com = TabularWeighting(6, num_classes=3, reduction="sum")
    fm = FunctionalModule(student)
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    xt = x.clone()
    if nan_train:
        xt[1, 2] = NAN
    tb = com.prepare(xt, y, index=torch.arange(6))
    xv = x.clone()
    if nan_val:
        xv[0, 0] = INF
    return train_loss_fn(com, fm), val_loss_fn(fm), fm.params(), com.hparams(), tb, {"x": xv, "y": y}


@pytest.mark.parametrize("solver_kw, err, match", [
    (dict(K=-1), ValueError, "K must be >= 0"),
    (dict(K=1.5), TypeError, "K must be an int"),
    (dict(alpha=0.0), ValueError, "alpha must be positive"),
    (dict(alpha=NAN), ValueError, "alpha must be finite"),
    (dict(alpha="0.1"), TypeError, "alpha must be a real number"),
    (dict(damping=-1.0), ValueError, "damping must be non-negative"),
    (dict(power_iters=0), ValueError, "power_iters must be >= 1"),
    (dict(on_divergence="ignore"), ValueError, "on_divergence"),
])
def test_engine_solver_config_is_validated(solver_kw, err, match):
    from commentaries_ext.engine import NeumannConfig, implicit_hypergradient

    COUNTS["engine.bad_config"] += 1
    tl, vl, params, hp, tb, vb = _ift_problem()
    with pytest.raises(err, match=match):
        implicit_hypergradient(tl, vl, params, hp, tb, vb, solver=NeumannConfig(**solver_kw))


def test_engine_nonfinite_batches_are_named():
    from commentaries_ext.engine import CGConfig, NeumannConfig, implicit_hypergradient

    tl, vl, params, hp, tb, vb = _ift_problem(nan_val=True)
    with pytest.raises(NonFiniteError, match="validation loss"):
        implicit_hypergradient(tl, vl, params, hp, tb, vb)
    for solver in (NeumannConfig(K=2, alpha=0.1), NeumannConfig(K=2, alpha=None), CGConfig(max_iter=3)):
        tl, vl, params, hp, tb, vb = _ift_problem(nan_train=True)
        with pytest.raises(NonFiniteError, match="training loss gradient"):
            implicit_hypergradient(tl, vl, params, hp, tb, vb, solver=solver, hvp="double_backward")
    with pytest.raises(ValueError, match="curvature"):
        implicit_hypergradient(tl, vl, params, hp, tb, vb, curvature="newton")
    with pytest.raises(TypeError, match="params"):
        implicit_hypergradient(tl, vl, [torch.zeros(2)], hp, tb, vb)
    COUNTS["engine.nonfinite"] += 6


def test_wrapper_skips_nonfinite_validation_batches():
    """nan_policy='skip': a NaN validation batch is a skipped (counted) hyper-step, not a crash."""
    from commentaries_ext.wrapper import CommentaryOptimizer

    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    com = TabularWeighting(6, num_classes=3, reduction="sum")
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    xv = x.clone()
    xv[0, 0] = NAN
    for policy in ("skip", "raise"):
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        t = CommentaryOptimizer(opt, student, com, val_loader=[(xv, y)], hyper_every=1, nan_policy=policy)
        t.zero_grad()
        t.loss(x, y, index=torch.arange(6)).backward()
        if policy == "raise":
            with pytest.raises(NonFiniteError):
                t.step()
        else:
            t.step()
            assert t.skipped_hyper_steps == 1 and t.hyper_steps == 0 and t.steps == 1
    COUNTS["wrapper.nonfinite_val"] += 2
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="hyper_every must be an int"):
        CommentaryOptimizer(opt, student, com, hyper_every=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        CommentaryOptimizer(opt, student, com, total_steps=-3)


def test_learn_ift_skips_nonfinite_validation_data():
    from commentaries_ext.learn import learn_ift

    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    xv = x.clone()
    xv[2, 1] = NAN
    res = learn_ift(TabularWeighting(12, num_classes=3, reduction="sum"), nn.Linear(4, 3), (x, y), (xv, y), steps=3,
                    batch_size=4, nan_policy="skip")
    assert res.info["skipped_hyper_steps"] == 3 and res.info["skipped_student_steps"] == 0
    assert all(math.isnan(r["val_loss"]) for r in res.history)
    with pytest.raises(NonFiniteError):
        learn_ift(TabularWeighting(12, num_classes=3, reduction="sum"), nn.Linear(4, 3), (x, y), (xv, y), steps=2,
                  batch_size=4)
    COUNTS["learn.nonfinite_val"] += 2


def test_loop_counts_are_validated():
    from commentaries_ext.engine import SGD, unroll
    from commentaries_ext.learn import learn_ift, train_student

    x, y = torch.randn(6, 4), torch.arange(6) % 3
    with pytest.raises(ValueError, match="hyper_every must be >= 0"):
        learn_ift(TabularWeighting(6, num_classes=3), nn.Linear(4, 3), (x, y), (x, y), steps=1, hyper_every=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train_student(nn.Linear(4, 3), (x, y), steps=1, batch_size=0)
    with pytest.raises(TypeError, match="steps must be an int"):
        train_student(nn.Linear(4, 3), (x, y), steps=2.5)
    loss = lambda p, b, h, batch: (p["w"] ** 2).sum()  # noqa: E731
    for kw in (dict(truncate=-2), dict(checkpoint=-1), dict(steps=-1)):
        with pytest.raises(ValueError, match="unroll: " + next(iter(kw))):
            unroll(loss, {"w": torch.ones(2)}, SGD(lr=0.1), [None, None], **kw)
    COUNTS["learn.bad_counts"] += 6


# --------------------------------------------------------------------------- report


def test_zz_report_counts():
    """The cases tried per category (``pytest -s`` shows them); every fuzz family ran."""
    lines = [f"{'category':64s} {'tried':>6s} {'ok':>5s} {'error':>6s}"]
    for cat in sorted(COUNTS):
        lines.append(f"{cat:64s} {COUNTS[cat]:6d} {OUTCOMES[cat, 'ok']:5d} {OUTCOMES[cat, 'error']:6d}")
    total = sum(v for k, v in COUNTS.items() if "(" not in k)
    lines.append(f"{'total':64s} {total:6d}")
    print("\n" + "\n".join(lines))
    out = os.environ.get("FUZZ_COUNTS_JSON")
    if out:
        with open(out, "w") as f:
            json.dump({"counts": dict(COUNTS), "outcomes": {f"{a}|{b}": v for (a, b), v in OUTCOMES.items()}}, f,
                      indent=1, sort_keys=True)
    if os.environ.get("FUZZ_REASONS"):
        for (cat, r), v in sorted(REASONS.items()):
            print(f"  {cat:40s} invalid {r:24s} {v:6d}")
    assert COUNTS, "no fuzz case ran"
    for fam in {k.split(".")[0] for k in COUNTS if k.split(".")[0] in ("cross_entropy", "blend", "solver", "commentary")}:
        ok = sum(v for (c, o), v in OUTCOMES.items() if c.startswith(fam + ".") and o == "ok")
        bad = sum(v for (c, o), v in OUTCOMES.items() if c.startswith(fam + ".") and o == "error")
        assert ok and bad, f"{fam}: the fuzzing drew only {'invalid' if not ok else 'valid'} cases"
