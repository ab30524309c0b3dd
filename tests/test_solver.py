"""Fused solver updates: every present backend against float64 references,
lists and flat buffers, 0-dim tensor scalars, chunk boundaries, determinism,
opcheck, the engine's use of them, and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from torch.library import opcheck

from commentaries_ext import backend
from commentaries_ext.ops import solver as S

BACKENDS = backend.candidates("neumann_step", "cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CHUNK = 16384  # the C++ chunk size: test sizes around it


def f64(t):
    return t.to(torch.float64, copy=True)


def d64(xs, ys):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(xs, ys))


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def make(shapes, dtype, gen, k):
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(k)]


shapes_st = st.lists(st.sampled_from([(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (33,), (CHUNK + 3,)]), min_size=1, max_size=4)


@pytest.mark.parametrize("bk", BACKENDS)
@given(shapes=shapes_st, dtype=st.sampled_from((torch.float32, torch.float64)), alpha=st.floats(-2, 2),
       as_tensor=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_all_ops_match_float64(bk, shapes, dtype, alpha, as_tensor, seed):
    if bk == "triton":
        shapes = [s for s in shapes if s != (CHUNK + 3,)] or [(5,)]
    gen = torch.Generator().manual_seed(seed)
    c, p, h, z = make(shapes, dtype, gen, 4)
    a = torch.tensor(alpha, dtype=dtype) if as_tensor else alpha
    c64, p64, h64, z64 = ([f64(t) for t in v] for v in (c, p, h, z))
    with backend.use(bk):
        # neumann step
        S.neumann_step_(c, p, h, a)
        for ci, pi, c0, p0, hi in zip(c, p, c64, p64, h64):
            nc = c0 - alpha * hi
            torch.testing.assert_close(ci.double(), nc, **tol(dtype))
            torch.testing.assert_close(pi.double(), p0 + nc, **tol(dtype))
        c64, p64 = [f64(t) for t in c], [f64(t) for t in p]
        # axpy_dot with z, then with z = y
        r = S.axpy_dot_(c, a, h, z)
        y64 = [ci + alpha * hi for ci, hi in zip(c64, h64)]
        scale = 1 + d64([t.abs() for t in y64], [t.abs() for t in z64])
        assert r.dtype == dtype and r.dim() == 0
        assert abs(float(r) - d64(y64, z64)) <= tol(dtype)["rtol"] * scale
        r = S.axpy_dot_(c, a, h, c)
        y64 = [ci + alpha * hi for ci, hi in zip(y64, h64)]
        torch.testing.assert_close(float(r), d64(y64, y64), rtol=tol(dtype)["rtol"] * 10, atol=1e-6)
        for ci, yi in zip(c, y64):
            torch.testing.assert_close(ci.double(), yi, **tol(dtype))
        # cg update
        x64, r64 = [f64(t) for t in c], [f64(t) for t in p]
        rr = S.cg_update_(c, p, h, z, a)
        nx = [xi + alpha * di for xi, di in zip(x64, h64)]
        nr = [ri - alpha * qi for ri, qi in zip(r64, z64)]
        for got, want in zip(c + p, nx + nr):
            torch.testing.assert_close(got.double(), want, **tol(dtype))
        torch.testing.assert_close(float(rr), d64(nr, nr), rtol=tol(dtype)["rtol"] * 10, atol=1e-6)
        # dot / norm
        cur = [f64(t) for t in c]
        zz = [f64(t) for t in z]
        got_dot = S.dot(c, z)
        assert abs(float(got_dot) - d64(cur, zz)) <= tol(dtype)["rtol"] * 10 * (1 + d64([t.abs() for t in cur], [t.abs() for t in zz]))
        torch.testing.assert_close(float(S.norm(c)), d64(cur, cur) ** 0.5, rtol=tol(dtype)["rtol"] * 10, atol=1e-6)


@pytest.mark.parametrize("bk", BACKENDS)
def test_flat_buffer_and_chunk_boundaries(bk):
    gen = torch.Generator().manual_seed(0)
    n = 2 * CHUNK + 17 if bk != "triton" else 1000
    c, p, h = (torch.randn(n, generator=gen) for _ in range(3))
    c0, p0 = f64(c), f64(p)
    with backend.use(bk):
        S.neumann_step_(c, p, h, torch.tensor(0.25))
    torch.testing.assert_close(c.double(), c0 - 0.25 * h.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.double(), p0 + c0 - 0.25 * h.double(), rtol=1e-6, atol=1e-6)
    with backend.use(bk):
        torch.testing.assert_close(float(S.dot(c, h)), float((c.double() * h.double()).sum()), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("bk", BACKENDS)
def test_empty_and_zero_size(bk):
    with backend.use(bk):
        assert float(S.norm([])) == 0.0
        S.neumann_step_([], [], [], 0.1)
        z = torch.zeros(0)
        assert float(S.dot([z], [z])) == 0.0
        c, p, h = [torch.ones(3), z.clone()], [torch.ones(3), z.clone()], [torch.ones(3), z.clone()]
        S.neumann_step_(c, p, h, 0.5)
        torch.testing.assert_close(p[0], torch.full((3,), 1.5))


def test_dot_does_not_depend_on_threads():
    assert "cpp" in BACKENDS, f"the compiled extension is not loaded (backends: {BACKENDS})"
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(CHUNK * 5 + 3, generator=gen), torch.randn(1000, generator=gen)]
    y = [torch.randn_like(t) for t in x]
    threads = torch.get_num_threads()
    try:
        with backend.use("cpp"):
            torch.set_num_threads(1)
            a = S.dot(x, y)
            torch.set_num_threads(max(2, threads))
            b = S.dot(x, y)
    finally:
        torch.set_num_threads(threads)
    assert float(a) == float(b)


@pytest.mark.parametrize("bk", BACKENDS)
def test_opcheck(bk):
    gen = torch.Generator().manual_seed(2)
    vs = make([(5,), (2, 3)], torch.float64, gen, 4)
    a = torch.tensor(0.3, dtype=torch.float64)
    with backend.use(bk):
        opcheck(S.neumann_step_op, ([t.clone() for t in vs[0]], [t.clone() for t in vs[1]], vs[2], a))
        opcheck(S.axpy_dot_op, ([t.clone() for t in vs[0]], a, vs[1], vs[2]))
        opcheck(S.axpy_dot_op, ([t.clone() for t in vs[0]], a, vs[1], []))
        opcheck(S.cg_update_op, ([t.clone() for t in vs[0]], [t.clone() for t in vs[1]], vs[2], vs[3], a))
        opcheck(S.multi_dot_op, (vs[0], vs[1]))
        opcheck(S.multi_dot_op, (vs[0], []))


def test_scalar_tensor_needs_no_host_value():
    # a 0-dim tensor scalar (e.g. rr / dHd from the previous iteration) is accepted as is
    x, d = [torch.zeros(4)], [torch.ones(4)]
    r, q = [torch.ones(4)], [torch.ones(4)]
    rr = S.cg_update_(x, r, d, q, torch.tensor(0.5))
    assert isinstance(rr, torch.Tensor) and rr.dim() == 0 and float(rr) == 1.0
    torch.testing.assert_close(x[0], torch.full((4,), 0.5))


def test_engine_uses_fused_ops():
    from commentaries_ext.engine import vector as V

    assert V.fused_available()
    gen = torch.Generator().manual_seed(3)
    c, p, h = make([(6,), (2, 2)], torch.float32, gen, 3)
    c2, p2 = [t.clone() for t in c], [t.clone() for t in p]
    V.neumann_step_(c, p, h, 0.1)
    torch._foreach_add_(c2, h, alpha=-0.1)
    torch._foreach_add_(p2, c2)
    for a, b in zip(c + p, c2 + p2):
        torch.testing.assert_close(a, b)
    r = V.axpy_dot_(c, -0.5, h, c)
    torch.testing.assert_close(float(r), d64(c, c), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    c, p, h = [torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(2)], [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="h has 1 tensors but c has 2"):
        S.neumann_step_(c, p, h[:1], 0.1)
    with pytest.raises(ValueError, match=r"h\[1\] has shape \(3,\) but c\[1\] has shape \(2,\)"):
        S.neumann_step_(c, p, [torch.zeros(3), torch.zeros(3)], 0.1)
    with pytest.raises(TypeError, match=r"p\[0\] has dtype torch.float64"):
        S.neumann_step_(c, [torch.zeros(3, dtype=torch.float64), torch.zeros(2)], h, 0.1)
    with pytest.raises(ValueError, match=r"h\[0\] is on meta"):
        S.neumann_step_(c, p, [torch.zeros(3, device="meta"), torch.zeros(2)], 0.1)
    with pytest.raises(TypeError, match="not supported on the CPU"):
        S.norm([torch.zeros(3, dtype=torch.float16)])
    with pytest.raises(TypeError, match="not supported on the CPU"):
        S.dot([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"c\[0\] is updated in place and must be contiguous"):
        S.neumann_step_([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], [torch.zeros(2, 3)], 0.1)
    with pytest.raises(ValueError, match="must not alias"):
        S.neumann_step_(c, c, h, 0.1)
    with pytest.raises(ValueError, match="updated in place"):
        S.neumann_step_(c, p, c, 0.1)
    with pytest.raises(ValueError, match="alpha must be a number or a 0-dim tensor"):
        S.neumann_step_(c, p, h, torch.zeros(2))
    with pytest.raises(TypeError, match="alpha must be a number"):
        S.neumann_step_(c, p, h, "x")
    with pytest.raises(TypeError, match=r"c\[1\] must be a Tensor"):
        S.neumann_step_([torch.zeros(3), 1.0], p, h, 0.1)
    with pytest.raises(TypeError, match="x must be a Tensor or a list"):
        S.norm(3.0)
    with pytest.raises(ValueError, match=r"z\[0\] shares memory with y\[0\], which is updated in place"):
        S.axpy_dot_(c, 0.1, h, [c[0], torch.zeros(2)])
    # a z starting where y does but not the same elements was taken for z=None (<y, y>) unchecked
    y8, y44 = torch.ones(8), torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"z\[0\] has shape \(4,\) but y\[0\] has shape \(8,\)"):
        S.axpy_dot_(y8, 1.0, torch.ones(8), y8[:4])
    with pytest.raises(ValueError, match=r"z\[0\] has shape \(2, 4\)"):
        S.axpy_dot_(y44, 1.0, torch.ones(4, 4), y44[:2])
    with pytest.raises(TypeError, match=r"z\[0\] has dtype torch.int32"):
        S.axpy_dot_(y8, 1.0, torch.ones(8), y8.view(torch.int32))
    assert S.axpy_dot_(y8, 1.0, torch.ones(8), y8.view(8)).item() == 32.0  # the same elements: <y, y>


def test_raw_cpu_ops_refuse_aliased_in_place_lists():
    """Called directly (torch.ops), the C++ ops check what the Python layer checks: a list updated
    in place must not share memory with any other argument (c = p gave 3.5 in the vector body and
    3.0 in the tail; c = [t, t] raced between threads)."""
    ops = torch.ops.commentaries_ext
    t, u, h = torch.ones(40), torch.ones(40), torch.ones(40)
    a = torch.tensor(0.5)
    upd = ", which is updated in place; the updated vectors must not alias"
    with pytest.raises(ValueError, match=r"neumann_step: p\[0\] shares memory with c\[0\]" + upd):
        ops.cpp_neumann_step([t], [t], [h], a)
    with pytest.raises(ValueError, match=r"c\[1\] shares memory with c\[0\]" + upd):
        ops.cpp_neumann_step([t, t], [u, torch.ones(40)], [h, h], a)
    with pytest.raises(ValueError, match=r"h\[0\] shares memory with c\[0\]" + upd):  # a partial overlap
        ops.cpp_neumann_step([t[:20]], [t[10:30].clone()], [t[10:30]], a)
    with pytest.raises(ValueError, match=r"z\[0\] shares memory with y\[0\]" + upd):
        ops.cpp_axpy_dot([t], a, [h], [t])
    with pytest.raises(ValueError, match=r"q\[0\] shares memory with r\[0\]" + upd):
        ops.cpp_cg_update([t], [u], [h], [u], a)
    # reading one tensor twice is fine (h twice, d = q)
    ops.cpp_neumann_step([t], [u], [h], a)
    ops.cpp_cg_update([t], [u], [h], [h], a)
    # c = 1 - 0.5 = 0.5, p = 1 + 0.5; then x = 0.5 + 0.5 * 1, r = 1.5 - 0.5 * 1 (the refused calls changed nothing)
    torch.testing.assert_close(t, torch.full((40,), 1.0))
    torch.testing.assert_close(u, torch.full((40,), 1.0))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_kernels_refuse_what_they_cannot_compute():
    """Called directly, the Triton solver kernels computed on whatever pointers they were given:
    x[4096] . y[2] read past y, a float32 . float64 dot read the wrong bytes, a strided y was
    written as if contiguous, c = p gave 1.5 against 1.0. They now refuse as the C++ ops do
    (checked when a tensor table is made; the table's key holds what the checks depend on)."""
    from commentaries_ext.triton_kernels import solver as TS

    one, a = torch.ones(4), torch.tensor(0.5)
    with pytest.raises(ValueError, match=r"multi_dot \(triton\): y\[0\] has shape \(2,\)"):
        TS.multi_dot([torch.ones(4096)], [torch.ones(2)])
    with pytest.raises(ValueError, match=r"y\[1\] has shape"):  # equal first tensors, the second differs
        TS.multi_dot([one, one], [one, torch.ones(3)])
    with pytest.raises(ValueError, match="y has 1 tensors but x has 2"):
        TS.multi_dot([one, one], [one])
    with pytest.raises(TypeError, match=r"y\[0\] is torch.float64"):
        TS.multi_dot([one], [one.double()])
    with pytest.raises(ValueError, match=r"axpy_dot \(triton\): y\[0\] must be contiguous"):
        TS.axpy_dot([torch.ones(4, 4).t()], a, [torch.ones(4, 4)], [])
    with pytest.raises(ValueError, match=r"p\[0\] shares memory with c\[0\]"):
        TS.neumann_step([one], [one], [torch.ones(4)], a)
    # the same tensors after a good call (a table is cached for them) still give the right values
    c, p, h = torch.ones(4), torch.zeros(4), torch.ones(4)
    for _ in range(2):
        TS.neumann_step([c], [p], [h], a)
    torch.testing.assert_close(c, torch.zeros(4))
    torch.testing.assert_close(p, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match=r"p\[0\] shares memory with c\[0\]"):  # c's table, then c = p
        TS.neumann_step([c], [c], [h], a)


def test_non_contiguous_read_only_inputs_are_accepted():
    c, p = [torch.zeros(2, 3)], [torch.zeros(2, 3)]
    h = [torch.arange(6.0).reshape(3, 2).t()]
    S.neumann_step_(c, p, h, 1.0)
    torch.testing.assert_close(c[0], -h[0])


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    for bk in backend.candidates("neumann_step", "cuda"):
        gen = torch.Generator().manual_seed(4)
        shapes = [(1000,), (3, 7), (70001,)]
        vs = [[torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes] for _ in range(4)]
        ref = [[t.clone() for t in v] for v in vs]
        with backend.use(bk):
            S.neumann_step_(vs[0], vs[1], vs[2], 0.1)
            r1 = S.axpy_dot_(vs[0], torch.tensor(0.2, device="cuda"), vs[2], vs[3])
            r2 = S.cg_update_(vs[0], vs[1], vs[2], vs[3], 0.3)
            r3 = S.norm(vs[0])
        with backend.use("reference"):
            S.neumann_step_(ref[0], ref[1], ref[2], 0.1)
            q1 = S.axpy_dot_(ref[0], 0.2, ref[2], ref[3])
            q2 = S.cg_update_(ref[0], ref[1], ref[2], ref[3], 0.3)
            q3 = S.norm(ref[0])
        t = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        for a, b in zip(vs[0] + vs[1], ref[0] + ref[1]):
            torch.testing.assert_close(a.float(), b.float(), rtol=t, atol=t)
        for a, b in ((r1, q1), (r2, q2), (r3, q3)):
            torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=t, atol=t)


def test_compile_uses_the_registered_ops():
    c, p, h = [torch.ones(5), torch.ones(3)], [torch.zeros(5), torch.zeros(3)], [torch.ones(5), torch.ones(3)]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(c, p, h):
        S.neumann_step_(c, p, h, 0.5)
        return S.dot(c, p)

    r = step(c, p, h)
    torch.testing.assert_close(c[0], torch.full((5,), 0.5))
    torch.testing.assert_close(p[1], torch.full((3,), 0.5))
    torch.testing.assert_close(float(r), 8 * 0.25)


def test_version_counters_bumped():
    c, p, h = [torch.zeros(3)], [torch.zeros(3)], [torch.ones(3)]
    v = (c[0]._version, p[0]._version)
    S.neumann_step_(c, p, h, 0.1)
    assert c[0]._version > v[0] and p[0]._version > v[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_solver_ops_refuse_graph_capture():
    """The GPU solver ops build their tensor tables on the host at each call, so a CUDA graph
    would replay stale tables: capturing them is an error, not a wrong replay."""
    from commentaries_ext import backend as bk_mod

    for bk in bk_mod.candidates("multi_dot", "cuda"):
        if bk == "reference":
            continue
        xs = [torch.randn(1000, device="cuda"), torch.randn(3, device="cuda")]
        kernel = bk_mod._kernels[bk]["multi_dot"]
        kernel(xs, [])  # warm-up (compilation) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="CUDA graph"):
            with torch.cuda.graph(graph):
                kernel(xs, [])
