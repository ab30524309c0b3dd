"""Masked blending: every present backend against a float64 autograd oracle,
broadcast masks, permutations (repeats, fixed points), layouts, gradcheck,
opcheck, and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.library import opcheck

from commentaries_ext import backend
from commentaries_ext.ops import blend as B
from commentaries_ext.ops.blend import masked_blend

BACKENDS = backend.candidates("blend_forward", "cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MASKS = ("example", "pixel", "channel", "full", "row", "example4d")


def mask_shape(kind: str, n: int, c: int, h: int, w: int) -> tuple[int, ...]:
    return {"example": (n,), "example4d": (n, 1, 1, 1), "pixel": (n, 1, h, w), "channel": (n, c, 1, 1),
            "full": (n, c, h, w), "row": (n, 1, 1, w)}[kind]


def oracle(x_a, m, x_b, perm, g):
    """float64 autograd of m * x_a + (1 - m) * partner; returns (out, grad_x_a, grad_m, grad_x_b)."""
    xa = x_a.detach().double().requires_grad_()
    mm = m.detach().double().requires_grad_()
    xb = None if x_b is None else x_b.detach().double().requires_grad_()
    mv = mm.view(-1, *([1] * (xa.dim() - 1))) if mm.dim() == 1 else mm
    src = xa if xb is None else xb
    partner = src if perm is None else src[perm]
    out = mv * xa + (1 - mv) * partner
    out.backward(g.double())
    return out.detach(), xa.grad, mm.grad, None if xb is None else xb.grad


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a non-contiguous view with the same values
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def run(bk, x_a, m, x_b, perm, g):
    with backend.use(bk):
        xa = x_a.detach().requires_grad_()
        mm = m.detach().requires_grad_()
        xb = None if x_b is None else x_b.detach().requires_grad_()
        out = masked_blend(xa, mm, x_b=xb, perm=perm)
        out.backward(g)
    return out.detach(), xa.grad, mm.grad, None if xb is None else xb.grad


def assert_close_all(got, want, dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, a, b in zip(("out", "grad_x_a", "grad_m", "grad_x_b"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("bk", BACKENDS)
@given(
    n=st.integers(1, 5), c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 9),
    mask=st.sampled_from(MASKS), mode=st.sampled_from(("perm", "x_b", "x_b_perm")),
    lay=st.sampled_from(("contiguous", "channels_last", "strided")),
    dtype=st.sampled_from((torch.float32, torch.float64)), data=st.data(),
)
def test_matches_float64_oracle(bk, n, c, h, w, mask, mode, lay, dtype, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x_a = layout(torch.randn(n, c, h, w, generator=gen, dtype=dtype), lay)
    m = torch.rand(mask_shape(mask, n, c, h, w), generator=gen, dtype=dtype)
    rows = n if mode != "x_b_perm" else data.draw(st.integers(1, 6))
    x_b = None if mode == "perm" else layout(torch.randn(rows, c, h, w, generator=gen, dtype=dtype), lay)
    perm = None
    if mode != "x_b":  # arbitrary indices: repeats and fixed points
        perm = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n)), dtype=torch.int64)
    g = layout(torch.randn(n, c, h, w, generator=gen, dtype=dtype), data.draw(st.sampled_from(("contiguous", "channels_last"))))
    got = run(bk, x_a, m, x_b, perm, g)
    assert_close_all(got, oracle(x_a, m, x_b, perm, g), dtype)
    assert got[0].is_contiguous() or got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("perm", [[0, 0, 0, 0], [0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3], [2, 0, 2, 0]])
def test_permutation_repeats_and_fixed_points(bk, perm):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 4, 5, generator=gen, dtype=torch.float64)
    perm = torch.tensor(perm)
    for m in (torch.rand(4, generator=gen, dtype=torch.float64), torch.rand(4, 1, 4, 5, generator=gen, dtype=torch.float64)):
        g = torch.randn(4, 3, 4, 5, generator=gen, dtype=torch.float64)
        assert_close_all(run(bk, x, m, None, perm, g), oracle(x, m, None, perm, g), torch.float64)


@pytest.mark.parametrize("bk", BACKENDS)
def test_larger_than_one_vector_and_chunk(bk):
    # runs longer than a SIMD vector and several threads' worth of rows
    gen = torch.Generator().manual_seed(2)
    n = 12 if bk != "triton" else 3
    x = torch.randn(n, 3, 17, 19, generator=gen)
    perms = (torch.randint(0, n, (n,), generator=gen), torch.randperm(n, generator=gen))  # repeats; a bijection
    masks = (torch.rand(n, generator=gen), torch.rand(n, 1, 17, 19, generator=gen), torch.rand(n, 3, 1, 1, generator=gen))
    for perm, m in ((p, m) for p in perms for m in masks):
        g = torch.randn_like(x)
        assert_close_all(run(bk, x, m, None, perm, g), oracle(x, m, None, perm, g), torch.float32)
        xc = x.contiguous(memory_format=torch.channels_last)
        assert_close_all(run(bk, xc, m, None, perm, g), oracle(xc, m, None, perm, g), torch.float32)


@pytest.mark.parametrize("bk", BACKENDS)
def test_expanded_mask_and_other_ranks(bk):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    xb = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    m0 = torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    got = run(bk, x, m0, xb, None, g)  # m broadcast over the batch: expanded inside
    want = oracle(x, m0.expand(3, 1, 4, 4).contiguous(), xb, None, g)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2].sum(0, keepdim=True))
    # 2-D inputs (tabular features) and 3-D
    for shape in ((5, 7), (4, 3, 6)):
        x2 = torch.randn(*shape, generator=gen, dtype=torch.float64)
        m2 = torch.rand(shape[0], generator=gen, dtype=torch.float64)
        p2 = torch.randint(0, shape[0], (shape[0],), generator=gen)
        g2 = torch.randn(*shape, generator=gen, dtype=torch.float64)
        assert_close_all(run(bk, x2, m2, None, p2, g2), oracle(x2, m2, None, p2, g2), torch.float64)


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_mask_gives_either_input_exactly(bk, dtype):
    """A 0/1 mask (CutMix-style, a hard attention mask) reproduces x_a or the partner bit for bit,
    also for values far apart in magnitude: the kernels computed the lerp xb + m (x_a - xb), which
    rounded 36 % of the elements (x_a = 1e-8 against a partner of 1 gave 0) and overflowed for
    x_a = 3e38 against -3e38."""
    gen = torch.Generator().manual_seed(11)
    x_a = torch.randn(4, 3, 5, 5, generator=gen, dtype=dtype) * torch.logspace(-8, 8, 5, dtype=dtype)
    x_b = torch.randn(4, 3, 5, 5, generator=gen, dtype=dtype)
    x_a[0, 0, 0, 0], x_b[0, 0, 0, 0] = 3e38, -3e38
    for m in (torch.randint(0, 2, (4, 1, 5, 5), generator=gen).to(dtype), torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype)):
        with backend.use(bk):
            out = masked_blend(x_a, m, x_b=x_b)
        mm = m.view(-1, 1, 1, 1) if m.dim() == 1 else m
        assert torch.equal(out, torch.where(mm.expand_as(x_a) == 1, x_a, x_b))


@pytest.mark.parametrize("bk", BACKENDS)
def test_many_dimensions_of_size_one(bk):
    """Size-1 dimensions do not count against the C++ layout's 12 (a 14-D tensor with two
    dimensions > 1 was refused)."""
    gen = torch.Generator().manual_seed(12)
    shape = (2,) + (1,) * 12 + (3,)
    x, xb, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    m = torch.rand((2,) + (1,) * 13, generator=gen, dtype=torch.float64)
    assert_close_all(run(bk, x, m, xb, None, g), oracle(x, m, xb, None, g), torch.float64)


def test_zero_partner():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, dtype=torch.float64, requires_grad=True)
    out = masked_blend(x, m)
    torch.testing.assert_close(out, m.view(-1, 1, 1, 1) * x)
    assert torch.autograd.gradcheck(lambda a, b: masked_blend(a, b), (x, m))


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("mode", ["perm", "x_b", "x_b_perm"])
@pytest.mark.parametrize("mask", ["example", "pixel", "channel"])
def test_gradcheck(bk, mode, mask):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.rand(mask_shape(mask, 3, 2, 3, 3), generator=gen, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(4 if mode == "x_b_perm" else 3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([2, 2, 0]) if mode == "perm" else torch.tensor([3, 0, 3])
    with backend.use(bk):
        if mode == "perm":
            fn, args = (lambda a, mm: masked_blend(a, mm, perm=perm)), (x, m)
        elif mode == "x_b":
            fn, args = (lambda a, mm, b: masked_blend(a, mm, x_b=b)), (x, m, xb)
        else:
            fn, args = (lambda a, mm, b: masked_blend(a, mm, x_b=b, perm=perm)), (x, m, xb)
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("bk", BACKENDS)
def test_opcheck(bk):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    xb = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    perm = torch.tensor([1, 1, 0])
    g = torch.randn_like(x)
    with backend.use(bk):
        for m in (torch.rand(3, 1, 1, 1, dtype=torch.float64), torch.rand(3, 1, 4, 4, dtype=torch.float64)):
            for args in ((x, m, None, perm), (x, m, xb, None), (x, m, xb, perm)):
                req = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                            for a in args)
                opcheck(B.masked_blend_op, req)
                opcheck(B.masked_blend_backward_op, (g,) + args + ([True, args[2] is not None, True],))
            xcl = x.contiguous(memory_format=torch.channels_last)
            opcheck(B.masked_blend_op, (xcl, m, None, perm))
            opcheck(B.masked_blend_backward_op, (g.contiguous(memory_format=torch.channels_last), xcl, m, None, perm,
                                                 [True, False, False]))


@pytest.mark.parametrize("bk", BACKENDS)
def test_kernel_outputs_and_mask(bk):
    """The kernel op honours output_mask (empty outputs) and writes every element (poisoned outputs)."""
    x = torch.randn(2, 3, 4, 4)
    m = torch.rand(2, 1, 4, 4)
    perm = torch.tensor([1, 0])
    fn = backend._kernels[bk]["blend_backward"]
    g = torch.randn_like(x)
    gxa, gxb, gm = fn(g, x, m, None, perm, [False, True, True])
    assert gxa.numel() == 0 and gxb.numel() == 0 and gm.shape == m.shape and gm.is_contiguous()
    assert torch.isfinite(gm).all()


def test_compile():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    m = torch.rand(4, 1, 5, 5, requires_grad=True)
    perm = torch.tensor([1, 2, 3, 0])
    f = torch.compile(lambda a, b: masked_blend(a, b, perm=perm).square().sum(), backend="aot_eager", fullgraph=True)
    f(x, m).backward()
    ga, gm = x.grad.clone(), m.grad.clone()
    x.grad = m.grad = None
    masked_blend(x, m, perm=perm).square().sum().backward()
    torch.testing.assert_close(ga, x.grad)
    torch.testing.assert_close(gm, m.grad)


# ----------------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    x = torch.randn(4, 3, 5, 5)
    m = torch.rand(4)
    with pytest.raises(ValueError, match="m of shape"):
        masked_blend(x, torch.rand(4, 2, 5, 5), perm=torch.arange(4))
    with pytest.raises(ValueError, match="per-example m"):
        masked_blend(x, torch.rand(3), perm=torch.arange(4))
    with pytest.raises(ValueError, match="x_b has shape"):
        masked_blend(x, m, x_b=torch.randn(4, 3, 5, 4))
    with pytest.raises(ValueError, match="x_b has shape"):
        masked_blend(x, m, x_b=torch.randn(5, 3, 5, 5))
    with pytest.raises(TypeError, match="m has dtype"):
        masked_blend(x, m.double(), perm=torch.arange(4))
    with pytest.raises(TypeError, match="x_b has dtype"):
        masked_blend(x, m, x_b=x.double())
    with pytest.raises(TypeError, match="x_a has dtype"):
        masked_blend(x.half(), m.half(), perm=torch.arange(4))
    with pytest.raises(TypeError, match="x_a has dtype"):
        masked_blend(x.long(), m.long(), perm=torch.arange(4))
    with pytest.raises(ValueError, match="m is on meta"):
        masked_blend(x, m.to("meta"), perm=torch.arange(4))
    with pytest.raises(ValueError, match="x_b is on meta"):
        masked_blend(x, m, x_b=x.to("meta"))
    with pytest.raises(ValueError, match="perm is on meta"):
        masked_blend(x, m, perm=torch.arange(4, device="meta"))
    with pytest.raises(IndexError, match="perm holds 4, out of range for x_a with 4 rows"):
        masked_blend(x, m, perm=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(IndexError, match="perm holds -1"):
        masked_blend(x, m, perm=torch.tensor([0, -1, 2, 3]))
    with pytest.raises(IndexError, match="x_b with 2 rows"):
        masked_blend(x, m, x_b=torch.randn(2, 3, 5, 5), perm=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="perm must have shape"):
        masked_blend(x, m, perm=torch.arange(3))
    with pytest.raises(TypeError, match="perm must be an integer"):
        masked_blend(x, m, perm=torch.arange(4.0))
    with pytest.raises(TypeError, match="x_a must be a Tensor"):
        masked_blend(x.numpy(), m, perm=torch.arange(4))


KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]  # the ones that address memory themselves


def _check_partner_errors(bk, device):
    x = torch.randn(4, 3, 5, 5, device=device)
    m = torch.rand(4, 1, 1, 1, device=device)
    g = torch.randn_like(x)
    fwd, bwd = backend._kernels[bk]["blend_forward"], backend._kernels[bk]["blend_backward"]
    sparse_rows = torch.randn(8, 3, 5, 5, device=device)[::2]
    with pytest.raises(RuntimeError, match="dense rows"):
        fwd(x, m, sparse_rows, None)
    with pytest.raises(RuntimeError, match="dense rows"):
        bwd(g, x, m, sparse_rows, None, [True, True, True])
    with pytest.raises(RuntimeError, match="dense rows"):
        fwd(x, m, torch.randn(4, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last), None)
    with pytest.raises(RuntimeError, match="x_a's 4 rows"):
        fwd(x, m, torch.randn(5, 3, 5, 5, device=device), None)
    with pytest.raises(RuntimeError, match="perm must be a contiguous int64"):
        fwd(x, m, None, torch.arange(4, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match=r"x_a must be (dense|contiguous)"):
        fwd(torch.randn(4, 3, 5, 7, device=device)[..., :5], m, None, torch.arange(4, device=device))
    # a size-1 dimension's stride is never used: any value is accepted
    one = torch.randn(4, 3, 1, 5, device=device).as_strided((4, 3, 1, 5), (15, 5, 99, 1))
    xa1 = torch.randn(4, 3, 1, 5, device=device)
    torch.testing.assert_close(fwd(xa1, m, one, None), m * xa1 + (1 - m) * one)
    if bk == "cpp":
        for bad in (4, -1):
            perm = torch.tensor([0, 1, bad, 2])
            with pytest.raises(RuntimeError, match=f"perm holds {bad}, out of range for 4 rows"):
                fwd(x, m, None, perm)
            with pytest.raises(RuntimeError, match=f"perm holds {bad}, out of range for 4 rows"):
                bwd(g, x, m, None, perm, [False, False, True])


def _check_x_a_m_grad_errors(bk, device):
    x = torch.randn(8, 4, 3, 3, device=device)
    perm = torch.randperm(8, device=device)
    fwd, bwd = backend._kernels[bk]["blend_forward"], backend._kernels[bk]["blend_backward"]
    gapped = r"x_a must be (dense|contiguous)"
    cases = [
        (x, torch.rand(2, 1, 1, 1, device=device), "m must have x_a's 8 rows"),
        (x, torch.rand(1, 1, 1, 1, device=device), "m must have x_a's 8 rows"),  # expand would accept it
        (x, torch.rand(8, 4, 2, 2, device=device), "does not broadcast to x_a"),
        (x, torch.rand(3, 3, device=device), "m must have x_a's rank"),
        (x, torch.rand(8, 1, 1, 1, device=device, dtype=torch.float64), "m must have x_a's dtype"),
        (torch.randn(8, 4, 3, 5, device=device)[..., :3], torch.rand(8, 1, 1, 1, device=device), gapped),
        (torch.randn(1, 4, 3, 5, device=device)[..., :3], torch.rand(1, 1, 1, 1, device=device), gapped),
    ]
    for xa, m, msg in cases:
        p = perm[: xa.shape[0]] % xa.shape[0]
        with pytest.raises(RuntimeError, match=msg):
            fwd(xa, m, None, p)
        with pytest.raises(RuntimeError, match=msg):
            bwd(xa, xa, m, None, p, [True, False, True])  # grad: x_a's strides
        if bk == "cpp":
            with pytest.raises(RuntimeError, match=msg):
                torch.ops.commentaries_ext.cpp_masked_blend(xa, m, None, p)
    m = torch.rand(8, 1, 1, 1, device=device)
    for grad in (x[:1], x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), x.double()):
        with pytest.raises(RuntimeError, match="grad must have x_a's shape, strides, dtype"):
            bwd(grad, x, m, None, perm, [True, False, True])


@pytest.mark.parametrize("check", [_check_x_a_m_grad_errors, _check_partner_errors])
@pytest.mark.parametrize("bk", KERNEL_BACKENDS)
def test_kernel_ops_check_what_they_address(bk, check):
    """The kernel ops, called directly, refuse what they would address out of bounds or read
    wrongly, in every backend alike: a gapped x_a; an m with other rows, rank, dtype or trailing
    sizes (expand() alone accepts an m of one row); a grad of another shape, layout or dtype; x_b
    rows that are not dense (x_b[::2]: its gradient was written with the wrong row stride), other
    trailing strides; a perm that is not int64 [N]. The C++ kernels also check perm's range (on a
    GPU that is masked_blend's check: it would synchronise with the host)."""
    check(bk, "cpu")


@CUDA
@pytest.mark.parametrize("check", [_check_x_a_m_grad_errors, _check_partner_errors])
def test_gpu_kernel_ops_check_what_they_address(check):
    for bk in backend.candidates("blend_forward", "cuda"):
        if bk != "reference":
            check(bk, "cuda")


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("mask", ["example", "pixel", "channel"])
@pytest.mark.parametrize("mode", ["perm", "x_b", "x_b_perm"])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_triton_rows_longer_than_the_grid(mask, mode, seed):
    """With grid axis 1 capped below a row's block count (65535 blocks on a GPU: rows of more
    than 67 M elements), each program loops over the rest of its row: the float64 oracle's
    results."""
    from commentaries_ext.triton_kernels import blend as tb

    n, c, h, w = 3, 3, 30, 31  # 2790 elements per row: 3 blocks of 1024
    gen = torch.Generator().manual_seed(seed)
    x_a = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    m = torch.rand(mask_shape(mask, n, c, h, w), generator=gen, dtype=torch.float64)
    rows = 5 if mode == "x_b_perm" else n
    x_b = None if mode == "perm" else torch.randn(rows, c, h, w, generator=gen, dtype=torch.float64)
    perm = None if mode == "x_b" else torch.randint(0, rows, (n,), generator=gen)  # repeats allowed
    g = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "MAX_GRID_1", 2)
        got = run("triton", x_a, m, x_b, perm, g)
    assert_close_all(got, oracle(x_a, m, x_b, perm, g), torch.float64)


def test_int32_perm_accepted():
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    m = torch.rand(3, dtype=torch.float64)
    a = masked_blend(x, m, perm=torch.tensor([2, 0, 1], dtype=torch.int32))
    b = masked_blend(x, m, perm=torch.tensor([2, 0, 1]))
    torch.testing.assert_close(a, b)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_oracle(dtype):
    for bk in backend.candidates("blend_forward", "cuda"):
        x = torch.randn(8, 3, 9, 11, device="cuda", dtype=dtype)
        perm = torch.randint(0, 8, (8,), device="cuda")
        for m in (torch.rand(8, device="cuda", dtype=dtype), torch.rand(8, 1, 9, 11, device="cuda", dtype=dtype)):
            g = torch.randn_like(x)
            got = run(bk, x, m, None, perm, g)
            want = oracle(x, m, None, perm, g)
            tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
            for a, b in zip(got, want):
                if b is not None:
                    torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("bk", BACKENDS)
def test_torch_func_and_forward_ad(bk):
    """torch.func.grad / jvp, forward-over-reverse (the engine's HVP mode) and forward-mode AD."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    m = torch.rand(4, 1, 5, 5, generator=gen, dtype=torch.float64)
    perm = torch.tensor([1, 1, 0, 3])
    tx, tm = torch.randn_like(x), torch.randn_like(m)

    def ref(a, b):
        return b * a + (1 - b) * a[perm]

    def ours(a, b):
        return masked_blend(a, b, perm=perm)

    with backend.use(bk):
        torch.testing.assert_close(torch.func.jvp(ours, (x, m), (tx, tm))[1], torch.func.jvp(ref, (x, m), (tx, tm))[1])
        for a, b in zip(torch.func.grad(lambda a, b: ours(a, b).square().sum(), argnums=(0, 1))(x, m),
                        torch.func.grad(lambda a, b: ref(a, b).square().sum(), argnums=(0, 1))(x, m)):
            torch.testing.assert_close(a, b)

        def fwd_over_rev(fn):
            return torch.func.jvp(lambda b: torch.func.grad(lambda a: fn(a, b).square().sum())(x), (m,), (tm,))[1]

        torch.testing.assert_close(fwd_over_rev(ours), fwd_over_rev(ref))
        if bk != "triton":  # the jvp formula is backend independent; the interpreter is slow
            xs, ms = x[:, :2, :3, :3].clone().requires_grad_(), m[:, :, :3, :3].clone().requires_grad_()
            xb = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda a, b, c: masked_blend(a, b, x_b=c, perm=perm.clamp(max=2)),
                                            (xs, ms, xb), check_forward_ad=True)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("mask", ["example", "pixel", "channel"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpp_autograd_op_matches_the_python_function(mask, layout):
    """The eager CPU path (forward and backward registered in C++) against the Python Function on
    the same kernels: the same bits, with an incoming gradient of other strides."""
    gen = torch.Generator().manual_seed(7)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(5, 3, 4, 6, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    m = torch.rand(mask_shape(mask, 5, 3, 4, 6), generator=gen).requires_grad_()
    perm = torch.tensor([4, 0, 0, 2, 1])
    g = torch.randn(5, 6, 4, 3, generator=gen).permute(0, 3, 2, 1)  # neither layout
    with backend.use("cpp"):
        out = masked_blend(x, m, perm=perm)
        assert "MaskedBlendFunction" in out.grad_fn.name()
        got = torch.autograd.grad(out, (x, m), g)
        mm = m.view(5, 1, 1, 1) if m.dim() == 1 else m
        ref_out = B._EagerBlendClassic.apply(x, mm, None, perm)
        want = torch.autograd.grad(ref_out, (x, m), g)
    assert torch.equal(out, ref_out)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_opcheck_of_the_cpp_autograd_op():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for args in ((x, m, None, torch.tensor([1, 1, 0])), (x, m, xb, None), (x, m, xb, torch.tensor([2, 0, 0]))):
        opcheck(torch.ops.commentaries_ext.cpp_masked_blend.default, args)
