"""Weighted / blended softmax cross-entropy: kernel ops of every present backend
vs a float64 reference, autograd (gradcheck, gradgradcheck, forward AD, double
backward through a student), opcheck, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from commentaries_ext import backend
from commentaries_ext.ops import cross_entropy as ce
from commentaries_ext.reference import cross_entropy as ref

IGNORE = -100
BACKENDS = backend.candidates("wce_forward", "cpu")
# elements of logits per example: Triton runs under the (slow) interpreter on the CPU
MAX_ELEMS = {"triton": 4096}
DEFAULT_MAX_ELEMS = 1 << 18


def _dims(backend_name: str):
    cap = MAX_ELEMS.get(backend_name, DEFAULT_MAX_ELEMS)
    maxn, maxc = (64, 256) if backend_name == "triton" else (4096, 2048)

    @st.composite
    def dims(draw):
        c = draw(st.one_of(st.integers(1, 16), st.integers(1, maxc)))
        n = draw(st.one_of(st.integers(1, 16), st.integers(1, max(1, min(maxn, cap // c)))))
        return n, c

    return dims()


def _inputs(n, c, dtype, *, mixed, ignore_some, extreme, layout, seed):
    g = torch.Generator().manual_seed(seed)
    z64 = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    yb = torch.randint(0, c, (n,), generator=g)
    lam = torch.rand(n, generator=g, dtype=torch.float64)
    if mixed:
        lam[::3] = 1.0  # exact endpoints
        lam[1::5] = 0.0
    if extreme:
        big = torch.tensor([1e4, -1e4], dtype=torch.float64)
        pick = torch.randint(0, 2, (n, c), generator=g)
        mask = torch.rand(n, c, generator=g) < 0.3
        z64 = torch.where(mask, big[pick], z64)
        neg = (torch.rand(n, c, generator=g) < 0.3)
        neg[torch.arange(n), y] = False
        if mixed:
            neg[torch.arange(n), yb] = False
        z64 = torch.where(neg, float("-inf"), z64)
    if ignore_some:
        y = torch.where(torch.rand(n, generator=g) < 0.3, torch.full_like(y, IGNORE), y)
    u64 = torch.randn(n, c, generator=g, dtype=torch.float64)
    t64 = torch.randn(n, c, generator=g, dtype=torch.float64)
    gl64 = torch.randn(n, generator=g, dtype=torch.float64)
    sc64 = torch.rand(n, generator=g, dtype=torch.float64)

    def lay(x):
        x = x.to(dtype)
        if layout == "transposed":  # column stride N
            return x.t().contiguous().t()
        if layout == "strided":  # every other column of a wider buffer, every row stride padded
            buf = torch.full((n, 2 * c + 3), float("nan"), dtype=dtype)
            buf[:, : 2 * c : 2] = x
            return buf[:, : 2 * c : 2]
        return x.contiguous()

    return dict(z64=z64, z=lay(z64), y=y, yb=yb if mixed else None, lam64=lam if mixed else None,
                lam=lam.to(dtype) if mixed else None, u64=u64, u=lay(u64), t64=t64, t=lay(t64), gl64=gl64,
                gl=gl64.to(dtype), sc64=sc64, sc=sc64.to(dtype))


def _tols(dtype, extreme):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    # |logits| up to 1e4: float32 lse (and so p = exp(z - lse)) is good to ulp(1e4) ~ 1e-3
    return dict(rtol=2e-5, atol=5e-5 if not extreme else 4e-3)


def _close(got, want, name, **tol):
    assert not torch.isnan(got).any() or torch.isnan(want).any(), f"{name}: NaN where the reference is not"
    torch.testing.assert_close(got.to(torch.float64), want, equal_nan=True, msg=lambda m: f"{name}: {m}", **tol)


def _check_backend(name, n, c, dtype, mixed, ignore_some, extreme, layout, seed):
    d = _inputs(n, c, dtype, mixed=mixed, ignore_some=ignore_some, extreme=extreme, layout=layout, seed=seed)
    # float64 oracle: the reference backend in float64 on the same (rounded) inputs
    for k in ("z", "lam", "u", "t", "gl", "sc"):
        if d[k] is not None:
            d[k + "64"] = d[k].to(torch.float64)
    r_loss, r_lse = ref.wce_forward(d["z64"], d["y"], d["yb"], d["lam64"], IGNORE)
    r_grad = ref.wce_backward(d["gl64"], d["z64"], r_lse, d["y"], d["yb"], d["lam64"], IGNORE)
    r_hvp = ref.wce_hvp(d["z64"], r_lse, d["sc64"], d["u64"])
    r_jvp = ref.wce_jvp(d["z64"], r_lse, d["y"], d["yb"], d["lam64"], d["t64"], IGNORE)
    with backend.use(name):
        k = {op: backend.kernel(op, "cpu") for op in ce.KERNEL_OPS}
        loss, lse = k["wce_forward"](d["z"], d["y"], d["yb"], d["lam"], IGNORE)
        lse_in = r_lse.to(dtype)
        grad = k["wce_backward"](d["gl"], d["z"], lse_in, d["y"], d["yb"], d["lam"], IGNORE)
        hvp = k["wce_hvp"](d["z"], lse_in, d["sc"], d["u"])
        jvp = k["wce_jvp"](d["z"], lse_in, d["y"], d["yb"], d["lam"], d["t"], IGNORE)
    tol = _tols(dtype, extreme)
    assert loss.shape == (n,) and lse.shape == (n,) and grad.shape == (n, c) and hvp.shape == (n, c)
    assert loss.dtype == dtype and grad.dtype == dtype and jvp.dtype == dtype
    _close(lse, r_lse, "lse", **tol)
    _close(loss, r_loss, "loss", **tol)
    _close(grad, r_grad, "grad", **tol)
    _close(hvp, r_hvp, "hvp", **tol)
    _close(jvp, r_jvp, "jvp", **tol)
    fused = backend._kernels[name].get("wce_forward_grad")  # the CPU backends' first-order fast path
    if fused is not None:
        f_loss, f_lse, f_grad = fused(d["z"], d["y"], d["yb"], d["lam"], d["gl"], IGNORE)
        assert f_grad.shape == (n, c) and f_grad.dtype == dtype and f_loss.dtype == dtype
        _close(f_lse, r_lse, "fused lse", **tol)
        _close(f_loss, r_loss, "fused loss", **tol)
        _close(f_grad, r_grad, "fused grad", **tol)  # row_scale = grad_loss: the same formula
        s_hvp = backend._kernels[name]["wce_softmax_hvp"](d["z"], d["sc"], d["u"])
        assert s_hvp.shape == (n, c) and s_hvp.dtype == dtype
        _close(s_hvp, r_hvp, "softmax hvp", **tol)
    if not extreme:  # the reference itself agrees with torch's cross-entropy
        valid = d["y"] != IGNORE
        want = F.cross_entropy(d["z64"], d["y"], reduction="none", ignore_index=IGNORE)
        if d["yb"] is not None:
            want = d["lam64"] * want + (1 - d["lam64"]) * F.cross_entropy(d["z64"], d["yb"], reduction="none")
        torch.testing.assert_close(r_loss, torch.where(valid, want, 0.0))


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_listed(name):
    assert "cpp" in BACKENDS and "reference" in BACKENDS, BACKENDS


def test_use_forces_a_backend_as_a_block_or_from_then_on():
    # the README said `backend.use("reference")`: a context manager, so a plain call did nothing
    assert backend.forced() is None
    with backend.use("reference"):
        assert backend.forced() == "reference"
    assert backend.forced() is None
    backend.use("reference")
    try:
        assert backend.forced() == "reference" and backend.select("wce_forward", "cpu")[0] == "reference"
    finally:
        backend.use("auto")
    assert backend.forced() is None


def test_a_forced_backend_that_cannot_run_does_not_turn_the_fused_loss_off_for_good(recwarn):
    # the commentary loss checks the fused ops once; a failure under a forced backend (cuda on a
    # CPU tensor) was remembered, so the process ran plain PyTorch losses from then on
    from commentaries_ext.commentary import base as B

    z, y, w = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.rand(6)
    saved = dict(B._CE_STATE)
    B._CE_STATE.clear()
    try:
        with backend.use("cuda"):
            B.commentary_loss(z, B.Prepared(x=z, target=y, weight=w))
        assert any("while backend 'cuda' is forced" in str(r.message) for r in recwarn)
        assert B._ops() is not None
    finally:
        B._CE_STATE.clear()
        B._CE_STATE.update(saved)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_float64(name, dtype):
    @settings(max_examples=12 if name == "triton" else 25)
    @given(dims=_dims(name), mixed=st.booleans(), ignore_some=st.booleans(), extreme=st.booleans(),
           layout=st.sampled_from(["contiguous", "transposed", "strided"]), seed=st.integers(0, 2**31 - 1))
    def run(dims, mixed, ignore_some, extreme, layout, seed):
        _check_backend(name, *dims, dtype, mixed, ignore_some, extreme, layout, seed)

    run()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 2048), (4096, 1), (3, 2049), (4099, 10)])
def test_kernel_edge_sizes(name, n, c):
    _check_backend(name, n, c, torch.float32, True, True, False, "contiguous", n * 7 + c)
    _check_backend(name, n, c, torch.float64, False, False, True, "transposed", n + c)


@pytest.mark.parametrize("n,c,dtype", [(2100, 2047, torch.float32), (2100, 1001, torch.float64)])
def test_cpp_streamed_outputs(n, c, dtype):
    """[N, C] outputs of 16 MB and more are written with non-temporal stores from a staging
    buffer (odd C: rows start at every alignment); both layouts of the logits."""
    assert n * c * torch.finfo(dtype).bits // 8 >= 16 << 20
    _check_backend("cpp", n, c, dtype, True, True, True, "contiguous", n + c)
    _check_backend("cpp", n, c, dtype, False, False, False, "transposed", n * c)


@pytest.mark.parametrize("name", BACKENDS)
def test_all_minus_inf_but_target_and_all_ignored(name):
    z = torch.full((4, 7), float("-inf"))
    z[:, 2] = 1e4
    y = torch.full((4,), 2)
    with backend.use(name):
        loss, lse = backend.kernel("wce_forward", "cpu")(z, y, None, None, IGNORE)
        assert torch.equal(loss, torch.zeros(4)) and torch.equal(lse, torch.full((4,), 1e4))
        grad = backend.kernel("wce_backward", "cpu")(torch.ones(4), z, lse, y, None, None, IGNORE)
        assert torch.equal(grad, torch.zeros(4, 7))
        yi = torch.full((4,), IGNORE)
        loss, lse = backend.kernel("wce_forward", "cpu")(z, yi, None, None, IGNORE)
        assert torch.equal(loss, torch.zeros(4))
        grad = backend.kernel("wce_backward", "cpu")(torch.ones(4), z, lse, yi, None, None, IGNORE)
        assert torch.equal(grad, torch.zeros(4, 7))
        jvp = backend.kernel("wce_jvp", "cpu")(z, lse, yi, None, None, torch.ones(4, 7), IGNORE)
        assert torch.equal(jvp, torch.zeros(4))


FUSED_BACKENDS = [b for b in BACKENDS if "wce_forward_grad" in backend._kernels[b]]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("c", [3, 10, 32, 100])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_nan_logits_give_nan(name, c, layout):
    """A NaN logit anywhere in a row (first column, a vector lane, the tail) makes that row's
    lse and loss NaN: never a finite number computed past it."""
    z = torch.randn(5, c)
    cols = [0, c // 2, c - 1, min(9, c - 1)]
    for r, col in enumerate(cols):
        z[r, col] = float("nan")
    if layout == "transposed":
        z = z.t().contiguous().t()
    y = torch.zeros(5, dtype=torch.int64)
    with backend.use(name):
        loss, lse = backend.kernel("wce_forward", "cpu")(z, y, None, None, IGNORE)
        outs = [(loss, lse)]
        if name in FUSED_BACKENDS:
            outs.append(backend._kernels[name]["wce_forward_grad"](z, y, None, None, None, IGNORE)[:2])
    for loss, lse in outs:
        assert torch.isnan(lse[:4]).all() and torch.isnan(loss[:4]).all(), (lse, loss)
        assert torch.isfinite(lse[4]) and torch.isfinite(loss[4])


@pytest.mark.parametrize("name", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [15, 16, 17, 24, 25, 31, 33, 100, 257])
def test_fused_grad_around_vector_widths(name, dtype, c):
    """wce_forward_grad at class counts around the vector widths (the small path, the row
    tail done as the last full vector, blocks of rows): targets in the first and last
    columns (inside the overlapped tail lanes), target_b == target on some rows, ignored
    rows, against the float64 reference."""
    n = 37
    g = torch.Generator().manual_seed(c)
    z64 = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, c, (n,), generator=g)
    y[::4], y[1::4] = c - 1, 0
    yb = torch.randint(0, c, (n,), generator=g)
    yb[::3] = y[::3]
    y[5::9] = IGNORE
    lam64 = torch.rand(n, generator=g, dtype=torch.float64)
    s64 = torch.rand(n, generator=g, dtype=torch.float64)
    z, lam, s = z64.to(dtype), lam64.to(dtype), s64.to(dtype)
    kern = backend._kernels[name]["wce_forward_grad"]
    tol = _tols(dtype, extreme=False)
    for mixed in (False, True):
        tb, lb, lb64 = (yb, lam, lam64) if mixed else (None, None, None)
        loss, lse, grad = kern(z, y, tb, lb, s, IGNORE)
        r_loss, r_lse = ref.wce_forward(z.to(torch.float64), y, tb, lb64, IGNORE)
        r_grad = ref.wce_backward(s64, z.to(torch.float64), r_lse, y, tb, lb64, IGNORE)
        _close(lse, r_lse, "lse", **tol)
        _close(loss, r_loss, "loss", **tol)
        _close(grad, r_grad, "grad", **tol)


@pytest.mark.parametrize("name", FUSED_BACKENDS)
@pytest.mark.parametrize("c", [16, 37, 100])
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6, deadline=None)
def test_fused_grad_special_rows_in_row_groups(name, c, seed):
    """wce_forward_grad reduces the rows of a block 16 at a time: rows holding a NaN, a +inf,
    only -inf, or +-1e4 among ordinary rows of the same group keep their own lse, loss and
    gradient (no lane of one row leaks into another), against the float64 reference."""
    n = 48
    g = torch.Generator().manual_seed(seed)
    z64 = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    rows = torch.randperm(n, generator=g)[:5].tolist()
    cols = torch.randint(0, c, (5,), generator=g).tolist()
    z64[rows[0], cols[0]] = float("nan")
    z64[rows[1], cols[1]] = float("inf")
    z64[rows[2]] = float("-inf")
    z64[rows[3]] = torch.where(torch.rand(c, generator=g) < 0.5, 1e4, -1e4).to(torch.float64)
    z64[rows[4]] = float("-inf")
    z64[rows[4], y[rows[4]]] = 2.0  # only the target finite
    s64 = torch.rand(n, generator=g, dtype=torch.float64)
    z, s = z64.float(), s64.float()
    loss, lse, grad = backend._kernels[name]["wce_forward_grad"](z, y, None, None, s, IGNORE)
    r_loss, r_lse = ref.wce_forward(z.double(), y, None, None, IGNORE)
    r_grad = ref.wce_backward(s64, z.double(), r_lse, y, None, None, IGNORE)
    tol = _tols(torch.float32, extreme=True)
    _close(lse, r_lse, "lse", **tol)
    _close(loss, r_loss, "loss", **tol)
    _close(grad, r_grad, "grad", **tol)
    ordinary = [r for r in range(n) if r not in rows[:3]]
    assert torch.isfinite(lse[ordinary]).all() and torch.isfinite(grad[ordinary]).all()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ kernels are not built")
def test_cpp_kernel_ops_check_their_inputs():
    """The C++ kernel ops, called directly, refuse what they would index out of bounds: a target
    (or, on a row not ignored, a target_b) outside [0, C), per-row and per-logit inputs of the
    wrong shape or dtype. ignore_index rows may hold anything; C == 0 reads no class."""
    ops = torch.ops.commentaries_ext
    z = torch.randn(4, 5)
    ones, lse = torch.ones(4), torch.logsumexp(z, 1)
    lam = torch.full((4,), 0.3)
    good = torch.tensor([0, 4, IGNORE, 2])
    calls = {
        "wce_forward": lambda y, yb=None: ops.cpp_wce_forward(z, y, yb, lam if yb is not None else None, IGNORE),
        "wce_forward_grad": lambda y, yb=None: ops.cpp_wce_forward_grad(
            z, y, yb, lam if yb is not None else None, ones, IGNORE),
        "wce_backward": lambda y, yb=None: ops.cpp_wce_backward(
            ones, z, lse, y, yb, lam if yb is not None else None, IGNORE),
        "wce_jvp": lambda y, yb=None: ops.cpp_wce_jvp(z, lse, y, yb, lam if yb is not None else None, z, IGNORE),
    }
    for name, call in calls.items():
        call(good)
        call(good, torch.tensor([1, 0, 99, 4]))  # the ignored row's target_b is never read
        for bad in (5, -1, 10**12):
            with pytest.raises(RuntimeError, match=f"{name}: target holds {bad}, out of range for 5 classes"):
                call(torch.tensor([0, bad, 1, 2]))
        with pytest.raises(RuntimeError, match=f"{name}: target_b holds 7, out of range"):
            call(good, torch.tensor([1, 7, 0, 0]))
        with pytest.raises(RuntimeError, match="target must have shape"):
            call(good[:3])
        with pytest.raises(RuntimeError, match="target must be int64"):
            call(good.int())
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.cpp_wce_backward(ones, z, lse[:3], good, None, None, IGNORE)
    with pytest.raises(RuntimeError, match="grad_loss must have the logits dtype"):
        ops.cpp_wce_backward(ones.double(), z, lse, good, None, None, IGNORE)
    with pytest.raises(RuntimeError, match="row_scale must have shape"):
        ops.cpp_wce_forward_grad(z, good, None, None, torch.ones(5), IGNORE)
    with pytest.raises(RuntimeError, match="lam must have shape"):
        ops.cpp_wce_forward(z, good, good, torch.ones(2), IGNORE)
    with pytest.raises(RuntimeError, match="u must have the shape of logits"):
        ops.cpp_wce_hvp(z, lse, ones, torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="t must have the logits dtype"):
        ops.cpp_wce_jvp(z, lse, good, None, None, z.double(), IGNORE)
    # one of target_b and lam alone was read as the plain form (the mixing dropped silently)
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name}: target_b and lam come together.*got target_b alone"):
            {"wce_forward": lambda: ops.cpp_wce_forward(z, good, good, None, IGNORE),
             "wce_forward_grad": lambda: ops.cpp_wce_forward_grad(z, good, good, None, ones, IGNORE),
             "wce_backward": lambda: ops.cpp_wce_backward(ones, z, lse, good, good, None, IGNORE),
             "wce_jvp": lambda: ops.cpp_wce_jvp(z, lse, good, good, None, z, IGNORE)}[name]()
    with pytest.raises(RuntimeError, match="got lam alone"):
        ops.cpp_wce_forward(z, good, None, lam, IGNORE)
    if hasattr(ops, "cpp_wce_reduced"):
        for args in ((good, None), (None, lam)):
            with pytest.raises(RuntimeError, match="cpp_wce_reduced: target_b and lam come together"):
                ops.cpp_wce_reduced(z, good, *args, None, 0, IGNORE)
            with pytest.raises(RuntimeError, match="cpp_wce_reduced: target_b and lam come together"):
                ops.cpp_wce_reduced(z.clone().requires_grad_(), good, *args, None, 0, IGNORE)
    loss, lse0 = ops.cpp_wce_forward(torch.randn(3, 0), torch.tensor([0, 3, 1]), None, None, IGNORE)
    assert torch.equal(loss, torch.zeros(3)) and torch.isneginf(lse0).all()


def _is_fused(out) -> bool:
    """Whether a reduced loss came from the fused path: the Python Function or, on the cpp
    backend, the C++ one (cpp_wce_reduced)."""
    name = out.grad_fn.name() if out.grad_fn is not None else ""
    return name == "_ReducedCEBackward" or "WceReducedFunction" in name


@pytest.mark.parametrize("name", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_reduced_path(name, reduction, weighted, monkeypatch):
    """A reduced loss on a CPU backend computes its logits gradient in the forward pass; it
    agrees with the two-pass path, accumulates into .grad, scales by the incoming gradient,
    and gives the same values on a second backward through a retained graph."""
    g = torch.Generator().manual_seed(11)
    n, c = 33, 7
    z0 = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[::5] = IGNORE
    w0 = torch.rand(n, generator=g, dtype=torch.float64) if weighted else None

    def run(fused: bool):
        z = z0.clone().requires_grad_()
        w = w0.clone().requires_grad_() if weighted else None
        with backend.use(name):
            if not fused:
                monkeypatch.setattr(ce, "_fused_kernel", lambda device, op="": None)
            out = ce.weighted_cross_entropy(z, y, w, reduction=reduction)
            monkeypatch.undo()
        assert _is_fused(out) == fused, out.grad_fn
        grads = torch.autograd.grad(out * 2.5, [z] + ([w] if weighted else []), retain_graph=True)
        again = torch.autograd.grad(out * 2.5, [z] + ([w] if weighted else []), retain_graph=True)
        for a, b in zip(grads, again):
            assert torch.equal(a, b)
        z.grad = torch.ones_like(z)
        out.backward()
        return out.detach(), grads, z.grad

    out_f, grads_f, acc_f = run(True)
    out_u, grads_u, acc_u = run(False)
    torch.testing.assert_close(out_f, out_u, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_f, grads_u):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc_f, acc_u, rtol=1e-12, atol=1e-12)
    assert not torch.equal(acc_f, torch.ones_like(acc_f))


def _reduced_case(n, c, seed, reduction, weighted, blended, transposed, cpp: bool):
    """A reduced loss through the C++ op (cpp) or the Python Function it replaces: its value, first
    derivatives w.r.t. logits, weight and lam with create_graph, a Hessian-vector product through
    the logits gradient to every input, and the first derivatives without a graph. Inputs have
    ignored rows, -inf logits off the targets, lam at 0 and 1, and a -inf partner logit where
    the partner's coefficient is 0 (a finite loss)."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (n,), generator=g)
    yb = torch.randint(0, c, (n,), generator=g)
    off = (torch.arange(c)[None, :] != y[:, None]) & (torch.arange(c)[None, :] != yb[:, None])
    z0 = torch.where(off & (torch.rand(n, c, generator=g) < 0.2), float("-inf"), z0)
    y[::6] = IGNORE
    lam0 = torch.rand(n, generator=g, dtype=torch.float64)
    lam0[1::5], lam0[2::7] = 0.0, 1.0
    if blended:
        for r in range(2, n, 7):
            if yb[r] != y[r]:
                z0[r, yb[r]] = float("-inf")
    w0 = torch.rand(n, generator=g, dtype=torch.float64)
    u = torch.randn(n, c, generator=g, dtype=torch.float64)
    z = (z0.t().contiguous().t() if transposed else z0.clone()).requires_grad_()  # column stride N
    w = w0.clone().requires_grad_() if weighted else None
    lam = lam0.clone().requires_grad_() if blended else None
    with pytest.MonkeyPatch.context() as mp, backend.use("cpp"):
        if not cpp:
            mp.setattr(ce, "_CPP_REDUCED", None)
        if blended:
            out = ce.blended_cross_entropy(z, y, yb, lam, w, reduction=reduction)
        else:
            out = ce.weighted_cross_entropy(z, y, w, reduction=reduction)
    assert ("WceReducedFunction" in out.grad_fn.name()) == cpp, out.grad_fn.name()
    inputs = [t for t in (z, w, lam) if t is not None]
    first = torch.autograd.grad(out, inputs, create_graph=True)
    second = torch.autograd.grad((first[0].nan_to_num(0.0) * u).sum(), inputs, allow_unused=True)
    plain = torch.autograd.grad(out, inputs)  # the first-order path (no graph)
    return out.detach(), first, second, plain


@pytest.mark.skipif(ce._CPP_REDUCED is None, reason="the compiled extension has no cpp_wce_reduced")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("blended", [False, True])
def test_cpp_reduced_matches_python_function(reduction, weighted, blended):
    """The C++ autograd op of the reduced loss (cpp_wce_reduced) against the Python Function it
    replaces (itself checked against float64 references and gradcheck above), on fresh random
    inputs (see _reduced_case): value, first and second derivatives, also for a mean over no
    rows (NaN loss; zero derivatives of the logits gradient on ignored rows, as PyTorch's)."""
    @settings(max_examples=15, deadline=None)
    @given(n=st.integers(1, 40), c=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), transposed=st.booleans())
    def run(n, c, seed, transposed):
        o_c, f_c, s_c, p_c = _reduced_case(n, c, seed, reduction, weighted, blended, transposed, cpp=True)
        o_p, f_p, s_p, p_p = _reduced_case(n, c, seed, reduction, weighted, blended, transposed, cpp=False)
        torch.testing.assert_close(o_c, o_p, rtol=1e-12, atol=1e-12, equal_nan=True)
        for a, b in zip(f_c + p_c, f_p + p_p):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12, equal_nan=True)
        for a, b in zip(s_c, s_p):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)

    run()


@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_hvp_without_derivatives_uses_one_pass(name, monkeypatch):
    """cross_entropy_hvp with nothing to differentiate runs wce_softmax_hvp (softmax in the
    same pass); it agrees with the lse + wce_hvp path, which still serves derivatives."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(29, 13, generator=g, dtype=torch.float64) * 3
    u = torch.randn(29, 13, generator=g, dtype=torch.float64)
    s = torch.rand(29, generator=g, dtype=torch.float64)
    calls = []
    real = ce._fused_kernel
    monkeypatch.setattr(ce, "_fused_kernel", lambda device, op="wce_forward_grad": calls.append(op) or real(device, op))
    with backend.use(name):
        fast = ce.cross_entropy_hvp(z, u, s)
        assert calls == ["wce_softmax_hvp"]
        zr = z.clone().requires_grad_()
        slow = ce.cross_entropy_hvp(zr, u, s)
        assert calls == ["wce_softmax_hvp"] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)


def test_fused_path_not_used_under_transforms_or_without_grad():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert _is_fused(ce.weighted_cross_entropy(z, y))
    assert not _is_fused(ce.weighted_cross_entropy(z.detach(), y, torch.rand(6, dtype=torch.float64,
                                                                             requires_grad=True)))
    # (only a logits gradient is worth computing ahead)
    gf = torch.func.grad(lambda z: ce.weighted_cross_entropy(z, y))(z.detach())
    want = torch.autograd.grad(F.cross_entropy(z, y), z)[0]
    torch.testing.assert_close(gf, want)


# ----------------------------------------------------------------- public functions and autograd


@pytest.mark.parametrize("name", BACKENDS)
def test_gradcheck_gradgradcheck(name):
    g = torch.Generator().manual_seed(1)
    n, c = 5, 4
    z = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(n, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(n, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, IGNORE, 3, 1])
    yb = torch.tensor([2, 2, 0, 1, 3])
    cases = [
        (lambda z, w: ce.weighted_cross_entropy(z, y, w, reduction="mean"), (z, w)),
        (lambda z, w: ce.weighted_cross_entropy(z.t().contiguous().t(), y, w, reduction="none"), (z, w)),
        (lambda z, w, l: ce.blended_cross_entropy(z, y, yb, l, w, reduction="sum"), (z, w, lam)),
        (lambda z, u, s: ce.cross_entropy_hvp(z, u, s), (z, u, s)),
        (lambda z, u, l: ce.cross_entropy_jvp(z, y, u, yb, l), (z, u, lam)),
    ]
    with backend.use(name):
        for f, args in cases:
            assert torch.autograd.gradcheck(f, args, check_forward_ad=True)
            assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_cross_entropy(name, reduction):
    g = torch.Generator().manual_seed(2)
    n, c = 37, 11
    z0 = torch.randn(n, c, generator=g) * 4
    y = torch.randint(0, c, (n,), generator=g)
    y[::4] = IGNORE
    w0 = torch.rand(n, generator=g)
    z1, w1 = z0.clone().requires_grad_(), w0.clone().requires_grad_()
    z2, w2 = z0.clone().requires_grad_(), w0.clone().requires_grad_()
    with backend.use(name):
        got = ce.weighted_cross_entropy(z1, y, w1, reduction=reduction)
    per = F.cross_entropy(z2, y, reduction="none", ignore_index=IGNORE) * w2
    want = {"none": per, "sum": per.sum(), "mean": per.sum() / (y != IGNORE).sum()}[reduction]
    torch.testing.assert_close(got, want)
    v = torch.randn_like(got)
    gz1, gw1 = torch.autograd.grad(got, (z1, w1), v)
    gz2, gw2 = torch.autograd.grad(want, (z2, w2), v)
    torch.testing.assert_close(gz1, gz2)
    torch.testing.assert_close(gw1, gw2)


@pytest.mark.parametrize("name", BACKENDS)
def test_blended_matches_torch(name):
    g = torch.Generator().manual_seed(3)
    n, c = 20, 6
    z0 = torch.randn(n, c, generator=g)
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    lam0 = 0.5 + 0.5 * torch.rand(n, generator=g)
    z1, l1 = z0.clone().requires_grad_(), lam0.clone().requires_grad_()
    z2, l2 = z0.clone().requires_grad_(), lam0.clone().requires_grad_()
    with backend.use(name):
        got = ce.blended_cross_entropy(z1, a, b, l1)
    want = (l2 * F.cross_entropy(z2, a, reduction="none") + (1 - l2) * F.cross_entropy(z2, b, reduction="none")).mean()
    torch.testing.assert_close(got, want)
    for x, y_ in zip(torch.autograd.grad(got, (z1, l1)), torch.autograd.grad(want, (z2, l2))):
        torch.testing.assert_close(x, y_)
    # a scalar lam broadcasts
    with backend.use(name):
        got = ce.blended_cross_entropy(z0, a, b, 0.7, reduction="sum")
    want = (0.7 * F.cross_entropy(z0, a, reduction="none") + 0.3 * F.cross_entropy(z0, b, reduction="none")).sum()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", BACKENDS)
def test_student_hessian_vector_product(name):
    """Double backward through an MLP with this loss gives the true HVP w.r.t. its parameters."""
    torch.manual_seed(4)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    y[2] = IGNORE
    w = torch.rand(9, dtype=torch.float64, requires_grad=True)
    params = list(mlp.parameters())
    vs = [torch.randn_like(p) for p in params]

    def hvp(loss_fn):
        loss = loss_fn(mlp(x))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, params + [w])

    with backend.use(name):
        got = hvp(lambda z: ce.weighted_cross_entropy(z, y, w, reduction="mean"))
    want = hvp(lambda z: (w * F.cross_entropy(z, y, reduction="none", ignore_index=IGNORE)).sum() / 8)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", BACKENDS)
def test_hvp_and_jvp_functions(name):
    g = torch.Generator().manual_seed(5)
    n, c = 13, 9
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    u = torch.randn(n, c, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    with backend.use(name):
        h = ce.cross_entropy_hvp(z, u, s)
        j = ce.cross_entropy_jvp(z, y, u)
    # per-row Hessian of the loss by autograd
    want_h = torch.stack([s[i] * torch.autograd.functional.hessian(lambda r: F.cross_entropy(r[None], y[i:i + 1]), z[i])
                          @ u[i] for i in range(n)])
    torch.testing.assert_close(h, want_h)
    _, want_j = torch.func.jvp(lambda z: F.cross_entropy(z, y, reduction="none"), (z,), (u,))
    torch.testing.assert_close(j, want_j)


def test_forward_over_reverse_hvp():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    yb = torch.randint(0, 5, (7,), generator=g)
    lam = torch.rand(7, generator=g, dtype=torch.float64)
    v = torch.randn_like(z)

    def f(z):
        return ce.blended_cross_entropy(z, y, yb, lam, reduction="sum")

    def f_ref(z):
        return (lam * F.cross_entropy(z, y, reduction="none") + (1 - lam) * F.cross_entropy(z, yb, reduction="none")).sum()

    got = torch.func.jvp(torch.func.grad(f), (z,), (v,))[1]
    want = torch.func.jvp(torch.func.grad(f_ref), (z,), (v,))[1]
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------- opcheck


def _opcheck_samples():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, IGNORE, 3, 4, 2])
    yb = torch.tensor([1, 1, 0, 2, 0, 4])
    lam = torch.rand(6, generator=g, dtype=torch.float64)
    lse = torch.logsumexp(z, 1)
    gl = torch.rand(6, generator=g, dtype=torch.float64)
    u = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return {
        "wce_forward": [(z, y, None, None, IGNORE), (z, y, yb, lam, IGNORE)],
        "wce_backward": [(gl, z, lse, y, None, None, IGNORE), (gl, z, lse, y, yb, lam, IGNORE)],
        "wce_hvp": [(z, lse, gl, u)],
        "wce_jvp": [(z, lse, y, yb, lam, u, IGNORE)],
    }


def test_opcheck_fused_cpu_op():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, IGNORE, 3, 4, 2])
    yb = torch.tensor([1, 1, 0, 2, 0, 4])
    lam = torch.rand(6, generator=g, dtype=torch.float64)
    s = torch.rand(6, generator=g, dtype=torch.float64)
    for args in [(z, y, None, None, None, IGNORE), (z, y, yb, lam, s, IGNORE), (z.t().contiguous().t(), y, None, None, s, IGNORE)]:
        torch.library.opcheck(torch.ops.commentaries_ext.cpp_wce_forward_grad, args,
                              test_utils=("test_schema", "test_faketensor"))
    for zz in (z, z.t().contiguous().t()):
        torch.library.opcheck(torch.ops.commentaries_ext.cpp_wce_softmax_hvp, (zz, s, torch.randn_like(z)),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(ce._CPP_REDUCED is None, reason="the compiled extension has no cpp_wce_reduced")
def test_opcheck_cpp_reduced():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, IGNORE, 3, 4, 2])
    yb = torch.tensor([1, 1, 0, 2, 0, 4])
    lam = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    for args in [(z, y, None, None, None, 0, IGNORE), (z, y, yb, lam, w, 2, IGNORE), (z, y, None, None, w, 1, IGNORE),
                 (z, y, None, None, None, 1, IGNORE), (z, y, yb, lam, None, 2, IGNORE)]:  # (unweighted means)
        # all of opcheck's tests: test_aot_dispatch_dynamic traces the C++ backward, which read
        # g.item() unconditionally (a data-dependent guard) before
        torch.library.opcheck(torch.ops.commentaries_ext.cpp_wce_reduced, args)


@pytest.mark.parametrize("op", ["wce_forward", "wce_backward", "wce_hvp", "wce_jvp"])
def test_opcheck(op):
    samples = _opcheck_samples()[op]
    for args in samples:
        torch.library.opcheck(getattr(torch.ops.commentaries_ext, op), args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        if hasattr(torch.ops.commentaries_ext, "cpp_" + op):
            torch.library.opcheck(getattr(torch.ops.commentaries_ext, "cpp_" + op), args,
                                  test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------- bad input


def test_bad_input_errors():
    z = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    with pytest.raises(IndexError, match="target holds 3"):
        ce.weighted_cross_entropy(z, torch.tensor([0, 3, 1, 1]))
    with pytest.raises(IndexError, match="target holds -1"):
        ce.weighted_cross_entropy(z, torch.tensor([0, -1, 1, 1]))
    with pytest.raises(IndexError, match="target_b holds 5"):
        ce.blended_cross_entropy(z, y, torch.tensor([0, 5, 1, 1]), 0.5)
    with pytest.raises(TypeError, match="target must be an integer"):
        ce.weighted_cross_entropy(z, y.float())
    with pytest.raises(TypeError, match="logits has dtype"):
        ce.weighted_cross_entropy(z.to(torch.int32), y)
    with pytest.raises(TypeError, match="logits has dtype torch.float16"):
        ce.weighted_cross_entropy(z.half(), y)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ce.weighted_cross_entropy(z[0], y)
    with pytest.raises(ValueError, match=r"target must have shape \[4\]"):
        ce.weighted_cross_entropy(z, y[:3])
    with pytest.raises(ValueError, match=r"weight must have shape \[4\]"):
        ce.weighted_cross_entropy(z, y, torch.ones(5))
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        ce.weighted_cross_entropy(z, y, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ce.weighted_cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="lam must have shape"):
        ce.blended_cross_entropy(z, y, y, torch.ones(3))
    with pytest.raises(ValueError, match="u must have the shape"):
        ce.cross_entropy_hvp(z, torch.ones(4, 2))
    with pytest.raises(ValueError, match="target_b and lam must be given together"):
        ce.per_example_cross_entropy(z, y, y)
    with pytest.raises(ValueError, match="is on meta"):
        ce.weighted_cross_entropy(z, y.to("meta"))
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="logits contains NaN"):
        ce.weighted_cross_entropy(bad, y, check_finite=True)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"logits contains \+inf"):
        ce.weighted_cross_entropy(bad, y, check_finite=True)
    ok = z.clone()
    ok[1, 0] = float("-inf")
    assert torch.isfinite(ce.weighted_cross_entropy(ok, y, check_finite=True))
    # ignore_index rows may hold ignore_index even when it is out of range
    assert torch.isfinite(ce.weighted_cross_entropy(z, torch.tensor([0, IGNORE, 1, 1])))


@pytest.mark.skipif(ce._CPP_REDUCED is None, reason="the compiled extension has no cpp_wce_reduced")
def test_cpp_reduced_path_checks_targets_in_the_kernel():
    """On the C++ reduced path the class indices are checked by the kernel, not by an aminmax in
    Python: a bad index still gets the Python check's IndexError (not chained to the kernel's
    RuntimeError), before any gradient exists; a mean counts the rows that are not ignored with
    strided targets too."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    with backend.use("cpp"):
        for reduction in ("sum", "mean"):
            for bad in ([0, 3, 1, 1], [0, -1, 1, 1]):
                with pytest.raises(IndexError, match=f"target holds {[v for v in bad if v not in (0, 1)][0]}") as err:
                    ce.weighted_cross_entropy(z, torch.tensor(bad), reduction=reduction)
                assert err.value.__context__ is None and err.value.__cause__ is None
            with pytest.raises(IndexError, match="target_a holds 3"):
                ce.blended_cross_entropy(z, torch.tensor([0, 3, 1, 1]), y, 0.5, reduction=reduction)
            with pytest.raises(IndexError, match="target_b holds 5"):
                ce.blended_cross_entropy(z, y, torch.tensor([0, 5, 1, 1]), 0.5, reduction=reduction)
            # an out-of-range target_b on an ignored row is never read
            out = ce.blended_cross_entropy(z, torch.tensor([0, IGNORE, 1, 1]), torch.tensor([0, 5, 1, 1]), 0.5,
                                           reduction=reduction)
            assert "WceReducedFunction" in out.grad_fn.name() and torch.isfinite(out)
        assert z.grad is None
        g = torch.Generator().manual_seed(5)
        zz = torch.randn(37, 6, generator=g, dtype=torch.float64, requires_grad=True)
        y2 = torch.randint(0, 6, (37, 2), generator=g)
        y2[::4, 0] = IGNORE
        y_strided = y2[:, 0]
        assert y_strided.stride(0) == 2
        out = ce.weighted_cross_entropy(zz, y_strided)
    assert "WceReducedFunction" in out.grad_fn.name()
    want = F.cross_entropy(zz, y_strided, ignore_index=IGNORE)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, zz)[0], torch.autograd.grad(want, zz)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(ce._CPP_REDUCED is None, reason="the compiled extension has no cpp_wce_reduced")
def test_cpp_reduced_path_errors_as_the_unfused_path():
    """With a bad class index and another bad argument (or a forced backend that cannot run),
    the error does not depend on whether the logits require grad (the C++ path or the Python
    check finding the index); a caught bad-index error leaves no reference cycle holding the
    logits."""
    import gc
    import weakref
    y_bad = torch.tensor([0, 3, 1, 1])

    def error(requires_grad, call):
        z = torch.randn(4, 3, dtype=torch.float64, requires_grad=requires_grad)
        with pytest.raises(Exception) as err:
            call(z)
        return type(err.value), str(err.value)

    calls = [
        lambda z: ce.weighted_cross_entropy(z, y_bad, torch.ones(5, dtype=torch.float64)),
        lambda z: ce.weighted_cross_entropy(z, y_bad, torch.ones(4, dtype=torch.float32)),
        lambda z: ce.blended_cross_entropy(z, y_bad, y_bad, "x"),
        lambda z: ce.blended_cross_entropy(z, torch.tensor([0, 1, 1, 1]), y_bad, torch.ones(3)),
    ]
    for call in calls:
        assert error(False, call) == error(True, call)
    with backend.use("cuda"):  # not runnable on CPU tensors
        forced = lambda z: ce.weighted_cross_entropy(z, y_bad, reduction="sum")  # noqa: E731
        assert error(False, forced) == error(True, forced)
        assert error(True, forced)[0] is IndexError
    gc.disable()
    try:
        z = torch.randn(50, 3, requires_grad=True)
        alive = weakref.ref(z)
        with backend.use("cpp"), pytest.raises(IndexError):
            ce.weighted_cross_entropy(z, torch.full((50,), 7))
        del z
        assert alive() is None
    finally:
        gc.enable()


def test_kernel_lookup_cache_stays_small_across_registrations():
    """Every backend.register() empties the lookup cache (its entries may be stale), so re-registering
    does not grow it."""
    fn = backend._kernels["reference"]["wce_forward"]
    z = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    for _ in range(50):
        backend.register("reference", "wce_forward", fn)
        ce.weighted_cross_entropy(z, y).backward()
    assert len(ce._KCACHE) <= 4


@pytest.mark.skipif(ce._CPP_REDUCED is None, reason="the compiled extension has no cpp_wce_reduced")
def test_cpp_reduced_mean_counts_targets_of_any_tensor_kind():
    """The C++ mean counts the non-ignored rows from the targets' memory only where that memory
    holds their values: a negative-bit view and a ZeroTensor give PyTorch's mean."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    neg = torch._neg_view(torch.tensor([0, 100, -1, -2]))  # values 0, -100, 1, 2
    zero = torch._efficientzerotensor(4, dtype=torch.int64)
    with backend.use("cpp"):
        for y in (neg, zero):
            out = ce.weighted_cross_entropy(z, y, ignore_index=-100)
            assert "WceReducedFunction" in out.grad_fn.name()
            torch.testing.assert_close(out, F.cross_entropy(z, y.clone(), ignore_index=-100),
                                       rtol=1e-12, atol=1e-12)


def test_empty_batch_and_all_ignored():
    z = torch.randn(0, 3, requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64)
    assert ce.weighted_cross_entropy(z, y, reduction="sum").item() == 0
    assert ce.weighted_cross_entropy(z, y, reduction="none").shape == (0,)
    z = torch.randn(3, 3)
    got = ce.weighted_cross_entropy(z, torch.full((3,), IGNORE))
    want = F.cross_entropy(z, torch.full((3,), IGNORE), ignore_index=IGNORE)
    assert math.isnan(got.item()) and math.isnan(want.item())


def test_compile_uses_custom_op():
    pytest.importorskip("torch._dynamo")
    z0 = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    w = torch.rand(8)

    def f(z):
        return ce.weighted_cross_entropy(z, y, w, reduction="sum")

    z1 = z0.clone().requires_grad_()
    z2 = z0.clone().requires_grad_()
    got = torch.compile(f, backend="aot_eager")(z1)
    want = (w * F.cross_entropy(z2, y, reduction="none")).sum()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, z1)[0], torch.autograd.grad(want, z2)[0])


@pytest.mark.parametrize("name", BACKENDS)
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6, deadline=None)
def test_jvp_with_another_ignore_index(name, seed):
    """cross_entropy_jvp computed its lse with the rows' targets but ignore_index -100, so a row
    ignored through another ignore_index had its target read as a class (out of range: a read
    outside the row; the C++ kernels' own check now refuses it). Found by the fuzz test."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 4, generator=g)
    t = torch.randn(3, 4, generator=g)
    big = 2**62
    y = torch.tensor([1, big, 3])
    with backend.use(name):
        got = ce.cross_entropy_jvp(z, y, t, ignore_index=big)
    p = torch.softmax(z.double(), 1)
    want = ((p - F.one_hot(torch.tensor([1, 0, 3]), 4)) * t.double()).sum(1)
    want[1] = 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
