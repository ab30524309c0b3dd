"""BatchNorm's hand-derived forward-mode rules (engine/batchnorm.py) against the
stock operator: values, gradients, and Hessian-vector products by
forward-over-reverse against a dense float64 Hessian."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jvp

from commentaries_ext.engine.batchnorm import BatchNormTrainBackward, batch_norm_reverse_rules, batch_norm_rules


def _loss(x, w, b, r, eps, affine=True):
    y = F.batch_norm(x, None, None, w if affine else None, b if affine else None, training=True, eps=eps)
    return (torch.sin(y) * r).sum()  # non-quadratic so that every second derivative is exercised


@st.composite
def problems(draw):
    n = draw(st.integers(2, 5))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + draw(st.sampled_from([0.0, 5.0])) * scale)
    if draw(st.booleans()) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif draw(st.booleans()):
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous strides
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    affine = draw(st.booleans())
    return x, w, b, r, eps, affine, g


@settings(max_examples=40, deadline=None)
@given(problems())
def test_values_gradients_and_hvp_match_the_dense_hessian(prob):
    x, w, b, r, eps, affine, g = prob
    f = lambda x_, w_, b_: _loss(x_, w_, b_, r, eps, affine)  # noqa: E731
    with batch_norm_rules():
        val = f(x, w, b)
        gr = grad(f, argnums=(0, 1, 2))(x, w, b)
    torch.testing.assert_close(val, f(x, w, b), rtol=1e-10, atol=1e-10)
    ref_g = grad(f, argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(gr, ref_g):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8 * max(1.0, float(e.abs().max())))

    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b))
    with batch_norm_rules():
        _, hv = jvp(grad(f, argnums=(0, 1, 2)), (x, w, b), tangents)

    # dense float64 Hessian of the stock operator over the flat (x, w, b)
    sizes = [x.numel(), w.numel(), b.numel()]

    def flat_f(z):
        xs, ws, bs = z.split(sizes)
        return f(xs.view(x.shape), ws, bs)

    z = torch.cat([x.reshape(-1), w, b])
    H = torch.autograd.functional.hessian(flat_f, z)
    expect = (H @ torch.cat([t.reshape(-1) for t in tangents])).split(sizes)
    t_max = float(torch.cat([t.reshape(-1) for t in tangents]).abs().max())
    # The x block can cancel to rounding level (N = 2 normalises to exactly +-1): its
    # absolute tolerance is relative to the size of the terms that cancel, ~ r w^2 rstd^2 M.
    dims = [0] + list(range(2, x.dim()))
    rstd_max = float((x.var(dims, unbiased=False) + eps).rsqrt().max())
    m = x.numel() // x.shape[1]
    term = float(r.abs().max()) * t_max * (1 + float(w.abs().max())) ** 2 * rstd_max**2 * m
    scale = float(H.abs().max()) * t_max
    # the same product in reverse mode (double backward through BatchNormTrainBackward.backward)
    xs, ws, bs = (t.detach().requires_grad_(True) for t in (x, w, b))
    with batch_norm_rules() as rules:
        gs = torch.autograd.grad(f(xs, ws, bs), (xs, ws, bs), create_graph=True, allow_unused=True)
    assert rules.calls == 1
    gs_used = [(gi, ti) for gi, ti in zip(gs, tangents) if gi is not None and gi.requires_grad]
    hv_rev = torch.autograd.grad([gi for gi, _ in gs_used], (xs, ws, bs), [ti for _, ti in gs_used], allow_unused=True)
    for i, (a, a_rev, e) in enumerate(zip(hv, hv_rev, expect)):
        if not affine and i > 0:
            continue  # weight and bias are not used without affine
        atol = 1e-9 * max(scale, term if i == 0 else 0.0) + 1e-300
        torch.testing.assert_close(a.reshape(-1), e, rtol=1e-7, atol=atol)
        torch.testing.assert_close(a_rev.reshape(-1), e, rtol=1e-7, atol=atol)


def test_float32_product_matches_the_stock_forward_ad():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 5, 5, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    r = torch.randn(x.shape, generator=g)
    f = lambda w_, b_, x_: _loss(x_, w_, b_, r, 1e-5)  # noqa: E731
    t = (torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(x.shape, generator=g))
    _, ref = jvp(grad(f, argnums=(0, 1, 2)), (w, b, x), t)
    with batch_norm_rules():
        _, got = jvp(grad(f, argnums=(0, 1, 2)), (w, b, x), t)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-4 * float(e.abs().max()))


def test_calls_it_does_not_handle_go_to_the_stock_operator():
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    with batch_norm_rules() as rules:
        y = F.batch_norm(x, rm, rv, training=True, momentum=0.5)  # running statistics: stock path
    assert rules.calls == 0
    assert not torch.equal(rm, torch.zeros(3)), "the stock operator updates the running mean in place"
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    with batch_norm_rules(), pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), None, None, training=True)  # the stock error, not a silent 0
    # half activations with float32 affine parameters (autocast): the stock operator, not the rules
    xh, w, b = torch.randn(4, 3, 2, dtype=torch.bfloat16), torch.rand(3), torch.rand(3)
    with batch_norm_rules() as rules:
        yh = F.batch_norm(xh, None, None, w, b, training=True)
    assert rules.calls == 0
    torch.testing.assert_close(yh, F.batch_norm(xh, None, None, w, b, training=True))


def test_a_third_derivative_is_refused_clearly():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with batch_norm_rules():
        (gx,) = torch.autograd.grad(torch.sin(F.batch_norm(x, None, None, training=True)).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        hx.sum().backward()


# ----------------------------------------------------------------- reverse-over-reverse rules (BPTT)


def _stock_or_rules(rules, x, w, b, r, eps, running, momentum=0.3, create_graph=True):
    """``(y, running stats, first gradients)`` of ``sum(sin(bn(x)) r)`` through the stock operator
    or :class:`batch_norm_reverse_rules`."""
    c = x.shape[1]
    rm = torch.linspace(-1, 1, c, dtype=x.dtype) if running else None
    rv = torch.linspace(0.5, 2, c, dtype=x.dtype) if running else None
    mode = batch_norm_reverse_rules() if rules else contextlib.nullcontext()
    with mode:
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
        gs = torch.autograd.grad((torch.sin(y) * r).sum(), (x, w, b), create_graph=create_graph)
    if rules:
        assert mode.calls == 1
    return y, rm, rv, gs


@settings(max_examples=40, deadline=None)
@given(problems(), st.booleans())
def test_reverse_rules_values_gradients_and_double_backward(prob, running):
    x, w, b, r, eps, _, g = prob
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
    got = _stock_or_rules(True, x, w, b, r, eps, running)
    ref = _stock_or_rules(False, x, w, b, r, eps, running)
    # the same ATen kernels forward and backward: the same bits, running statistics included
    for a, e in zip(got[:3], ref[:3]):
        assert (a is None and e is None) or torch.equal(a, e)
    for a, e in zip(got[3], ref[3]):
        assert torch.equal(a, e)
    # the double backward (the product an outer backward of BPTT takes) against the dense
    # float64 Hessian of the stock operator
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, b))
    hv = torch.autograd.grad(got[3], (x, w, b), tangents)
    sizes = [x.numel(), w.numel(), b.numel()]

    def flat_f(z):
        xs, ws, bs = z.split(sizes)
        return _loss(xs.view(x.shape), ws, bs, r, eps)

    H = torch.autograd.functional.hessian(flat_f, torch.cat([x.detach().reshape(-1), w.detach(), b.detach()]))
    expect = (H @ torch.cat([t.reshape(-1) for t in tangents])).split(sizes)
    dims = [0] + list(range(2, x.dim()))
    rstd_max = float((x.detach().var(dims, unbiased=False) + eps).rsqrt().max())
    t_max = float(torch.cat([t.reshape(-1) for t in tangents]).abs().max())
    term = float(r.abs().max()) * t_max * (1 + float(w.abs().max())) ** 2 * rstd_max**2 * (x.numel() // x.shape[1])
    scale = float(H.abs().max()) * t_max
    for i, (a, e) in enumerate(zip(hv, expect)):
        torch.testing.assert_close(a.reshape(-1), e, rtol=1e-7, atol=1e-9 * max(scale, term if i == 0 else 0.0) + 1e-300)


def _batch_norm_composite(x, w, b, eps):
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x - x.mean(dims, keepdim=True)) * (x.var(dims, unbiased=False, keepdim=True) + eps).rsqrt()
    return xhat * w.view(shape) + b.view(shape)


def test_reverse_rules_third_derivative_matches_the_composite_batch_norm():
    # (the stock operator is no reference here: in torch 2.13 its third derivative w.r.t. x is
    # off by ~6 % on this problem, while its lower derivatives agree with the composite)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def third(rules):
        with batch_norm_reverse_rules() if rules else contextlib.nullcontext():
            y = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5) if rules else \
                _batch_norm_composite(x, w, b, 1e-5)
            gs = torch.autograd.grad((torch.sin(y) * r).sum(), (x, w, b), create_graph=True)
            hs = torch.autograd.grad(sum((t * t).sum() for t in gs), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum(torch.cos(t).sum() for t in hs), (x, w, b))

    for a, e in zip(third(True), third(False)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10 * float(e.abs().max()))


def test_reverse_rules_leave_other_calls_to_the_stock_operator():
    x = torch.randn(4, 3, 2, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    with batch_norm_reverse_rules() as rules:
        F.batch_norm(x, rm, rv, training=True)  # no affine parameters
        F.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), training=False)  # eval mode
        F.batch_norm(torch.randn(2, 3, 1, 1, 1, 2, requires_grad=True), None, None, torch.ones(3), torch.zeros(3),
                     training=True)  # 6-D
        with pytest.raises(RuntimeError, match="mixed dtype"):  # the stock error
            F.batch_norm(x.double(), None, None, torch.ones(3), torch.zeros(3), training=True)
        with torch.no_grad():
            F.batch_norm(x, None, None, torch.ones(3), torch.zeros(3), training=True)
        assert rules.calls == 0
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm(torch.randn(1, 3), None, None, torch.ones(3), torch.zeros(3), training=True)
        F.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), training=True)
        assert rules.calls == 1
