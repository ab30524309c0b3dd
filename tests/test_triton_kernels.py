"""Triton kernels vs float64 oracles.

Without a GPU they run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set by conftest): sizes stay small.  The CUDA-only tests
(bf16/fp16 inputs, the CUDA C++ backend against Triton) are skipped without a GPU.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from commentaries_ext import backend  # noqa: E402
from commentaries_ext.triton_kernels import cross_entropy as tce  # noqa: E402
from commentaries_ext.triton_kernels import solver as tsolver  # noqa: E402

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------- float64 oracle


def oracle(z, y, yb, lam, g, scale, u, t, ignore_index=IGNORE):
    z = z.double()
    n, c = z.shape
    rows = torch.arange(n, device=z.device)
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    lse = torch.logsumexp(z, 1)
    p = torch.softmax(z, 1)
    mix = torch.zeros_like(z)
    if yb is None or lam is None:
        mix[rows, ys] = 1.0
    else:
        lm = lam.double()
        mix[rows, ys] += lm
        mix[rows, torch.where(valid, yb, 0)] += 1 - lm
    tgt = (mix * torch.where(mix != 0, z, torch.zeros_like(z))).sum(1)
    loss = torch.where(valid, lse - tgt, torch.zeros_like(lse))
    grad = torch.where(valid[:, None], g.double()[:, None] * (p - mix), torch.zeros_like(p))
    ud = u.double()
    hvp = scale.double()[:, None] * (p * ud - p * (p * ud).sum(1, keepdim=True))
    jvp = torch.where(valid, ((p - mix) * t.double()).sum(1), torch.zeros_like(lse))
    return loss, lse, grad, hvp, jvp


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values with another memory layout."""
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        n, c = x.shape
        big = torch.full((n * 2, c * 3), float("nan"), dtype=x.dtype, device=x.device)
        big[::2, ::3] = x
        return big[::2, ::3]
    return x


def run_all(z, y, yb, lam, g, scale, u, t):
    with backend.use("triton"):
        loss, lse = backend.kernel("wce_forward", z.device)(z, y, yb, lam, IGNORE)
        grad = backend.kernel("wce_backward", z.device)(g, z, lse, y, yb, lam, IGNORE)
        hvp = backend.kernel("wce_hvp", z.device)(z, lse, scale, u)
        jvp = backend.kernel("wce_jvp", z.device)(z, lse, y, yb, lam, t, IGNORE)
    return loss, lse, grad, hvp, jvp


def check(outs, refs, dtype, row_dtype):
    names = ("loss", "lse", "grad", "hvp", "jvp")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    if dtype in (torch.float16, torch.bfloat16):
        tol = dict(rtol=2e-2, atol=2e-2)
    for name, out, ref in zip(names, outs, refs):
        want = row_dtype if name in ("loss", "lse", "jvp") else dtype
        assert out.dtype == want, (name, out.dtype, want)
        assert not torch.isnan(out).any(), f"{name}: NaN (unwritten output or bad math)"
        # relative to the magnitude of the terms: the loss is lse minus the target logits, so
        # with logits of 1e4 a loss near 0 carries ulp(1e4) ~ 1e-3 of float32 rounding
        scale = refs[1].abs().max().clamp(min=1.0) if name in ("loss", "lse") else 1.0
        torch.testing.assert_close(out.double() / scale, ref / scale, **tol, msg=lambda m: f"{name}: {m}")


def make_case(n, c, dtype, mixed, ignore_some, extreme, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=gen, dtype=torch.float64) * 4
    y = torch.randint(0, c, (n,), generator=gen)
    yb = torch.randint(0, c, (n,), generator=gen)
    if extreme:
        # +-1e4 logits and -inf on columns that are neither target
        z[:, 0] = 1e4
        if c > 2:
            z[:, c // 2] = -1e4
        for i in range(n):
            free = [k for k in range(c) if k not in (int(y[i]), int(yb[i]))]
            if free:
                z[i, free[int(torch.randint(0, len(free), (1,), generator=gen))]] = float("-inf")
    if ignore_some:
        y[torch.rand(n, generator=gen) < 0.3] = IGNORE
    row = torch.float64 if dtype == torch.float64 else torch.float32
    lam = torch.rand(n, generator=gen, dtype=torch.float64).to(row)
    if n > 1:
        lam[0] = 1.0
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(row)
    scale = torch.rand(n, generator=gen, dtype=torch.float64).to(row)
    u = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
    z = z.to(dtype)
    args = [z, y, yb if mixed else None, lam if mixed else None, g, scale, u, t]
    return [a.to(device) if a is not None else None for a in args], row


@pytest.fixture
def small_blocks(monkeypatch):
    """Column blocks of 8 so that small C runs the multi-block (online logsumexp) path."""
    monkeypatch.setattr(tce, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(tce, "MAX_TILE", 32)


# ----------------------------------------------------------------- cross-entropy


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(2, 41), dtype=st.sampled_from((torch.float32, torch.float64)),
       mixed=st.booleans(), ignore_some=st.booleans(), extreme=st.booleans(),
       kind=st.sampled_from(("contiguous", "transposed", "strided")), seed=st.integers(0, 2**31 - 1))
# a loss of 0 from logits of 1e4 (lse minus lam z[y] + (1 - lam) z[yb], y == yb): float32 rounding of 1e-3
@example(n=2, c=2, dtype=torch.float32, mixed=True, ignore_some=True, extreme=True, kind="contiguous", seed=110770)
def test_wce_matches_float64(n, c, dtype, mixed, ignore_some, extreme, kind, seed):
    (z, y, yb, lam, g, scale, u, t), row = make_case(n, c, dtype, mixed, ignore_some, extreme, seed)
    refs = oracle(z, y, yb, lam, g, scale, u, t)
    z, u, t = layout(z, kind), layout(u, kind), layout(t, "strided" if kind == "transposed" else kind)
    check(run_all(z, y, yb, lam, g, scale, u, t), refs, dtype, row)


@pytest.mark.parametrize("n,c", [(3, 37), (5, 8), (1, 9), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wce_column_loop(small_blocks, n, c, dtype):
    # C larger than one column block: online logsumexp and the two-pass HVP
    for mixed, extreme, kind in ((False, False, "contiguous"), (True, True, "transposed"), (True, False, "strided")):
        (z, y, yb, lam, g, scale, u, t), row = make_case(n, c, dtype, mixed, True, extreme, seed=n * 100 + c)
        refs = oracle(z, y, yb, lam, g, scale, u, t)
        check(run_all(layout(z, kind), y, yb, lam, g, scale, layout(u, kind), t), refs, dtype, row)


def test_wce_first_block_all_minus_inf(small_blocks):
    # a whole leading column block at -inf must not turn the running sum into NaN
    (z, y, yb, lam, g, scale, u, t), row = make_case(4, 30, torch.float32, True, False, False, seed=3)
    z[:, :16] = float("-inf")
    y = torch.full_like(y, 20)
    yb = torch.full_like(yb, 29)
    refs = oracle(z, y, yb, lam, g, scale, u, t)
    check(run_all(z, y, yb, lam, g, scale, u, t), refs, torch.float32, row)


def test_wce_all_rows_ignored_and_empty():
    (z, y, yb, lam, g, scale, u, t), row = make_case(5, 6, torch.float32, True, False, False, seed=1)
    y.fill_(IGNORE)
    loss, lse, grad, hvp, jvp = run_all(z, y, yb, lam, g, scale, u, t)
    assert (loss == 0).all() and (grad == 0).all() and (jvp == 0).all()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.double(), 1))
    e = torch.empty(0, 6, device=DEVICE)
    ei = torch.empty(0, dtype=torch.int64, device=DEVICE)
    er = torch.empty(0, device=DEVICE)
    outs = run_all(e, ei, None, None, er, er, e, e)
    assert [tuple(o.shape) for o in outs] == [(0,), (0,), (0, 6), (0, 6), (0,)]


def test_wce_other_ignore_index():
    (z, y, yb, lam, g, scale, u, t), row = make_case(6, 5, torch.float64, False, False, False, seed=4)
    y[1] = 3
    with backend.use("triton"):
        loss, lse = backend.kernel("wce_forward", z.device)(z, y, None, None, 3)
    ref = torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]
    ref[y == 3] = 0
    torch.testing.assert_close(loss, ref)


# ----------------------------------------------------------------- solver: multi-tensor table cache


def test_solver_table_cache_follows_buffers():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (2500,), (1, 4)]  # one tensor spans two blocks
    for _ in range(2):  # the second round reuses the cached tables of new buffers or old ones
        x = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in shapes]
        y = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in shapes]
        want = sum(float((a * b).sum()) for a, b in zip(x, y))
        for _ in range(2):
            got = tsolver.multi_dot(x, y)
            assert abs(float(got) - want) < 1e-9 * (1 + abs(want))
        assert abs(float(tsolver.multi_dot(x, [])) - sum(float((a * a).sum()) for a in x)) < 1e-9 * 1e4


# ----------------------------------------------------------------- GPU only


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(33, 10), (5, 5000), (64, 1000)])
def test_wce_half_inputs_gpu(dtype, n, c):
    (z, y, yb, lam, g, scale, u, t), row = make_case(n, c, dtype, True, True, False, seed=c, device="cuda")
    refs = oracle(z, y, yb, lam, g, scale, u, t)
    check(run_all(z, y, yb, lam, g, scale, u, t), refs, dtype, row)


def _cuda_has(op: str) -> bool:
    return op in backend._kernels["cuda"]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(33, 10), (7, 4099), (129, 1000)])
@pytest.mark.parametrize("kind", ["contiguous", "transposed"])
def test_cuda_wce_matches_float64(dtype, n, c, kind):
    if not _cuda_has("wce_forward"):
        pytest.skip("the CUDA C++ kernels are not built")
    (z, y, yb, lam, g, scale, u, t), row = make_case(n, c, dtype, True, True, dtype != torch.float16, seed=n,
                                                     device="cuda")
    refs = oracle(z, y, yb, lam, g, scale, u, t)
    z, u = layout(z, kind), layout(u, kind)
    with backend.use("cuda"):
        loss, lse = backend.kernel("wce_forward", "cuda")(z, y, yb, lam, IGNORE)
        grad = backend.kernel("wce_backward", "cuda")(g, z, lse, y, yb, lam, IGNORE)
        hvp = backend.kernel("wce_hvp", "cuda")(z, lse, scale, u)
        jvp = backend.kernel("wce_jvp", "cuda")(z, lse, y, yb, lam, t, IGNORE)
    check((loss, lse, grad, hvp, jvp), refs, dtype, row)


@needs_gpu
@pytest.mark.parametrize("bk", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_blend_and_solver_half(bk, dtype):
    if not _cuda_has("blend_forward") and bk == "cuda":
        pytest.skip("the CUDA C++ kernels are not built")
    from commentaries_ext.reference import blend as rb
    from commentaries_ext.reference import solver as rs

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 9, 11, generator=gen).to("cuda", dtype)
    xb = torch.randn(8, 3, 9, 11, generator=gen).to("cuda", dtype)
    perm = torch.randint(0, 8, (8,), generator=gen).cuda()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    for m in (torch.rand(8, 1, 1, 1, generator=gen), torch.rand(8, 1, 9, 11, generator=gen),
              torch.rand(8, 3, 9, 11, generator=gen)):
        m = m.to("cuda", dtype)
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            for b, p in ((None, perm), (xb.contiguous(memory_format=torch.channels_last)
                                        if xx.is_contiguous(memory_format=torch.channels_last)
                                        and not xx.is_contiguous() else xb, perm), (xb, None)):
                if b is not None and b.stride() != xx.stride():
                    b = torch.empty_like(xx).copy_(b)
                if b is None and p is None:
                    continue
                g = torch.empty_like(xx).copy_(torch.randn(xx.shape, generator=gen).to(dtype))
                with backend.use(bk):
                    out = backend.kernel("blend_forward", "cuda")(xx, m, b, p)
                    grads = backend.kernel("blend_backward", "cuda")(g, xx, m, b, p, [True, True, True])
                torch.testing.assert_close(out.float(), rb.blend_forward(xx, m, b, p).float(), **tol)
                for got, want in zip(grads, rb.blend_backward(g, xx, m, b, p, [True, True, True])):
                    torch.testing.assert_close(got.float(), want.float(), **tol)
    sizes = [(5,), (70000,), (3, 3)]
    vs = [[torch.randn(s, generator=gen).to("cuda", dtype) for s in sizes] for _ in range(4)]
    ws = [[v.clone() for v in vs_] for vs_ in vs]
    a = torch.tensor(0.3, device="cuda")
    with backend.use(bk):
        r1 = backend.kernel("cg_update", "cuda")(vs[0], vs[1], vs[2], vs[3], a)
    r2 = rs.cg_update(ws[0], ws[1], ws[2], ws[3], a)
    torch.testing.assert_close(r1, r2, rtol=1e-2, atol=1e-1)
    for v, w in zip(vs[0] + vs[1], ws[0] + ws[1]):
        torch.testing.assert_close(v.float(), w.float(), **tol)


def _plus_inf_case(c, dtype, device, seed):
    """Rows with +inf logits (one, two, on the target, with a NaN, in the first or last
    column) among ordinary rows."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(7, c, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (7,), generator=gen)
    inf = float("inf")
    z[0, c - 1] = inf
    z[1, 0] = z[1, c // 2] = inf
    y[1] = 1 if c > 2 else 0
    z[2, y[2]] = inf  # the target itself: loss inf - inf = NaN
    z[3, 0], z[3, c - 1] = inf, float("nan")
    z[4] = -inf
    z[4, c // 3] = inf
    return z.to(device, dtype), y.to(device)


@pytest.mark.parametrize("bk", backend.candidates("wce_forward", DEVICE))
@pytest.mark.parametrize("c", [3, 40, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_wce_plus_inf_logits_every_backend(bk, c, dtype, seed):
    """A +inf logit gives lse = +inf (NaN with a NaN in the row) on every backend, as the
    float64 reference and torch.logsumexp do, and the kernels that take the lse agree with it
    (p = 0 on finite columns): no exp(inf - inf) NaN in the online logsumexp. Triton also with
    column blocks of 8 (its multi-block path)."""
    ref = pytest.importorskip("commentaries_ext.reference.cross_entropy")
    z, y = _plus_inf_case(c, dtype, DEVICE, seed)
    n = z.shape[0]
    row = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.ones(n, dtype=row, device=DEVICE)
    u = torch.randn(n, c, dtype=dtype, device=DEVICE)
    z64, g64, u64 = z.double(), g.double(), u.double()
    want_loss, want_lse = ref.wce_forward(z64, y, None, None, IGNORE)
    assert want_lse[:3].isinf().all() and want_lse[3].isnan() and want_lse[4].isinf()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for small in ((False, True) if bk == "triton" else (False,)):
        with pytest.MonkeyPatch.context() as mp:
            if small:
                mp.setattr(tce, "MAX_BLOCK_C", 8)
                mp.setattr(tce, "MAX_TILE", 32)
            with backend.use(bk):
                loss, lse = backend.kernel("wce_forward", DEVICE)(z, y, None, None, IGNORE)
                grad = backend.kernel("wce_backward", DEVICE)(g, z, lse, y, None, None, IGNORE)
                hvp = backend.kernel("wce_hvp", DEVICE)(z, lse, g, u)
        for got, want in ((lse, want_lse), (loss, want_loss),
                          (grad, ref.wce_backward(g64, z64, want_lse, y, None, None, IGNORE)),
                          (hvp, ref.wce_hvp(z64, want_lse, g64, u64))):
            torch.testing.assert_close(got.double(), want, equal_nan=True, **tol)


@pytest.mark.parametrize("bk", [b for b in backend.candidates("wce_forward", DEVICE) if b in ("triton", "cuda")])
def test_gpu_kernels_guard_their_inputs(bk):
    """The GPU kernels cannot raise on a target's value without a host synchronisation: a target
    out of range gives a NaN loss (no load outside the row; the C++ kernels raise instead), an
    ignored row may hold anything. Shapes are checked on the host: a short target, lse or a
    tangent of another shape is an error, not an access out of bounds."""
    z = torch.randn(4, 5, device=DEVICE)
    lam = torch.full((4,), 0.25, device=DEVICE)
    y = torch.tensor([0, 7, IGNORE, -2], device=DEVICE)
    with backend.use(bk):
        fwd = backend.kernel("wce_forward", DEVICE)
        loss, lse = fwd(z, y, None, None, IGNORE)
        assert torch.isfinite(loss[0]) and loss[1].isnan() and loss[2] == 0 and loss[3].isnan()
        assert torch.isfinite(lse).all()
        yb = torch.tensor([1, 2, 99, 5], device=DEVICE)  # row 2 ignored: its target_b is never read
        loss, _ = fwd(z, torch.tensor([0, 1, IGNORE, 3], device=DEVICE), yb, lam, IGNORE)
        assert torch.isfinite(loss[:2]).all() and loss[2] == 0 and loss[3].isnan()
        # the jvp gathers t at the targets: the same guard (it read outside the row: a segfault
        # under the interpreter, an illegal address on a GPU)
        jvp = backend.kernel("wce_jvp", DEVICE)(z, lse, y, None, None, torch.randn_like(z), IGNORE)
        assert torch.isfinite(jvp[0]) and jvp[1].isnan() and jvp[2] == 0 and jvp[3].isnan()
        jvp = backend.kernel("wce_jvp", DEVICE)(z, lse, torch.tensor([0, 1, IGNORE, 3], device=DEVICE), yb, lam,
                                                torch.randn_like(z), IGNORE)
        assert torch.isfinite(jvp[:2]).all() and jvp[2] == 0 and jvp[3].isnan()
        # and the backward (it returned p itself for such a row: a plausible, wrong gradient)
        bwd = backend.kernel("wce_backward", DEVICE)
        g = torch.ones(4, device=DEVICE)
        grad = bwd(g, z, lse, y, None, None, IGNORE)
        assert torch.isfinite(grad[0]).all() and grad[1].isnan().all() and (grad[2] == 0).all() and grad[3].isnan().all()
        grad = bwd(g, z, lse, torch.tensor([0, 1, IGNORE, 3], device=DEVICE), yb, lam, IGNORE)
        assert torch.isfinite(grad[:2]).all() and (grad[2] == 0).all() and grad[3].isnan().all()
        with pytest.raises(RuntimeError, match="target must have shape"):
            fwd(z, y[:2], None, None, IGNORE)
        with pytest.raises(RuntimeError, match="lse must have shape"):
            backend.kernel("wce_backward", DEVICE)(torch.ones(4, device=DEVICE), z, lse[:3], y.clamp(0, 4), None,
                                                   None, IGNORE)
        with pytest.raises(RuntimeError, match="u must have the shape of logits"):
            backend.kernel("wce_hvp", DEVICE)(z, lse, torch.ones(4, device=DEVICE), z[:, :3])
        with pytest.raises(RuntimeError, match="t must have the shape of logits"):
            backend.kernel("wce_jvp", DEVICE)(z, lse, y.clamp(0, 4), None, None, z[:2], IGNORE)


@pytest.mark.parametrize("n,c", [(5, 0), (0, 4), (4, 1), (9, 23)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wce_same_as_reference_backend_edge_cases(n, c, dtype):
    # degenerate shapes agree with `reference`; half-given mixing arguments (target_b without lam, ...)
    # are refused by both (they were read as the plain form, dropping the mixing silently)
    ref = pytest.importorskip("commentaries_ext.reference.cross_entropy")
    gen = torch.Generator().manual_seed(n * 10 + c)
    z = (torch.randn(n, c, generator=gen, dtype=dtype) * 3).to(DEVICE)
    y = torch.randint(0, max(c, 1), (n,), generator=gen).to(DEVICE)
    yb = torch.randint(0, max(c, 1), (n,), generator=gen).to(DEVICE)
    if n > 1:
        y[1] = IGNORE
    lam, g = (torch.rand(n, generator=gen, dtype=dtype).to(DEVICE) for _ in range(2))
    u, t = (torch.randn(n, c, generator=gen, dtype=dtype).to(DEVICE) for _ in range(2))
    for half in ((yb, None), (None, lam)):
        for impl in (tce, ref):
            with pytest.raises(RuntimeError, match="target_b and lam come together"):
                impl.wce_forward(z, y, *half, IGNORE)
            with pytest.raises(RuntimeError, match="target_b and lam come together"):
                impl.wce_jvp(z, torch.zeros(n, dtype=dtype, device=DEVICE), y, *half, t, IGNORE)
    for mix in ((yb, lam), (None, None)):
        got = tce.wce_forward(z, y, *mix, IGNORE)
        want = ref.wce_forward(z, y, *mix, IGNORE)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        lse = want[1]
        torch.testing.assert_close(tce.wce_backward(g, z, lse, y, *mix, IGNORE), ref.wce_backward(g, z, lse, y, *mix, IGNORE))
        torch.testing.assert_close(tce.wce_jvp(z, lse, y, *mix, t, IGNORE), ref.wce_jvp(z, lse, y, *mix, t, IGNORE))
    torch.testing.assert_close(tce.wce_hvp(z, want[1], g, u), ref.wce_hvp(z, want[1], g, u))


# ----------------------------------------------------------------- GPU compilation without a GPU


def test_every_triton_kernel_compiles_for_sm90():
    # The interpreter runs the kernels' math but not their lowering to the GPU: compile
    # every kernel variant (dtypes, constexpr branches) to a cubin for sm_90 ahead of time.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "commentaries_ext.triton_kernels._aot_check", "90"], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0 and "ptxas" in (res.stdout + res.stderr) and "not found" in (res.stdout + res.stderr):
        pytest.skip("Triton's bundled ptxas is missing")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    assert "compiled" in res.stdout


def test_launchers_run_on_their_tensors_gpu(monkeypatch):
    """A launcher whose tensors live on another GPU than the current one runs with that GPU
    current (Triton launches on the current device); CPU tensors and the current GPU pass
    straight through. Checked with a stand-in for torch.cuda's device switching."""
    from commentaries_ext.triton_kernels._common import on_tensor_device

    entered = []

    class Switch:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class FakeTensor:
        def __init__(self, device):
            self.device = torch.device(device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    seen = []
    launcher = on_tensor_device(lambda *args: seen.append((len(args), list(entered))) or "done")
    assert launcher(FakeTensor("cuda:1"), 3) == "done"
    assert seen[-1] == (2, [torch.device("cuda:1")]) and entered[-1] == "exit"
    entered.clear()
    launcher([FakeTensor("cuda:1"), FakeTensor("cuda:1")])  # a solver op's first list
    assert seen[-1][1] == [torch.device("cuda:1")]
    entered.clear()
    for first in (FakeTensor("cuda:0"), FakeTensor("cpu"), []):
        launcher(first)
        assert seen[-1][1] == [] and entered == []


@needs_gpu
@pytest.mark.parametrize("bk", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gpu_solver_ops_match_reference(bk, dtype):
    if bk == "cuda" and not _cuda_has("neumann_step"):
        pytest.skip("the CUDA C++ kernels are not built")
    from commentaries_ext.reference import solver as rs

    gen = torch.Generator().manual_seed(1)
    sizes = [(1,), (4097,), (3, 5), (70000,)]  # block boundaries of both backends
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    a = torch.tensor(-0.7, dtype=acc, device="cuda")

    def lists(k):
        return [[torch.randn(s, generator=gen).to("cuda", dtype) for s in sizes] for _ in range(k)]

    def clone(ls):
        return [[t.clone() for t in v] for v in ls]

    kern = backend._kernels[bk]
    v = lists(4)
    w = clone(v)
    kern["neumann_step"](v[0], v[1], v[2], a)
    rs.neumann_step(w[0], w[1], w[2], a)
    for x, y in zip(v[0] + v[1], w[0] + w[1]):
        torch.testing.assert_close(x.float(), y.float(), **tol)
    for z in (v[3], []):
        v2, w2 = clone(v), clone(v)
        r1 = kern["axpy_dot"](v2[0], a, v2[2], z)
        r2 = rs.axpy_dot(w2[0], a, w2[2], z)
        assert r1.dtype == acc and r1.dim() == 0
        torch.testing.assert_close(r1, r2, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
        torch.testing.assert_close(kern["multi_dot"](v[0], z), rs.multi_dot(v[0], z), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, scripts/gpu_check runs the script on it")
def test_the_device_smoke_script_passes():
    """python/device_smoke.py is what a GPU session runs first (scripts/gpu_check); here it runs the
    Triton backend under the interpreter, so that the script itself cannot rot before a device run."""
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, TRITON_INTERPRET="1", SMOKE_QUICK="1")
    res = subprocess.run([sys.executable, os.path.join(root, "python", "device_smoke.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " 0 failures" in res.stdout and "triton" in res.stdout
