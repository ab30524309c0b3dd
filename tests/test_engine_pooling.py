"""Max pooling through channels-last (engine/pooling.py): the same values, indices and
derivatives as ATen's NCHW kernel, in eager autograd and in rewritten make_fx graphs."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from commentaries_ext.engine.pooling import pool_channels_last, pool_rules


@st.composite
def pools(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(8, 20))
    h, w = draw(st.integers(3, 11)), draw(st.integers(3, 11))
    k = draw(st.integers(1, 3))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, k // 2))
    d = draw(st.integers(1, 2))
    if (k - 1) * d + 1 > min(h, w) + 2 * p:
        d = 1
    ceil = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "extreme"]))
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    if kind == "ties":  # few distinct values: which of the equal maxima wins must not change
        x = torch.randint(0, 3, (n, c, h, w), generator=g).to(dtype)
    elif kind == "extreme":
        mask = torch.rand(x.shape, generator=g)
        x[mask < 0.1] = float("nan")
        x[(mask >= 0.1) & (mask < 0.2)] = float("-inf")
        x[(mask >= 0.2) & (mask < 0.25)] = float("inf")
    return x, dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=ceil)


@settings(max_examples=60, deadline=None)
@given(pools())
def test_values_indices_and_gradients_match_the_nchw_kernel(case):
    x, kw = case
    ref_out, ref_idx = F.max_pool2d(x, return_indices=True, **kw)
    with pool_rules() as rules:
        out, idx = F.max_pool2d(x, return_indices=True, **kw)
        out2 = F.max_pool2d(x, **kw)
    assert rules.calls == 2
    assert out.is_contiguous() and idx.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out2, ref_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ref_idx)

    if torch.isfinite(x).all():
        g = torch.randn(ref_out.shape, dtype=x.dtype)
        xs = x.clone().requires_grad_(True)
        (ref_gx,) = torch.autograd.grad(F.max_pool2d(xs, **kw), xs, g)
        with pool_rules():
            (gx,) = torch.autograd.grad(F.max_pool2d(xs, **kw), xs, g)
        assert torch.equal(gx, ref_gx)


def test_double_backward_matches_the_stock_operator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def hvp(rules):
        with pool_rules() if rules else contextlib.nullcontext():
            (gx,) = torch.autograd.grad((torch.sin(F.max_pool2d(x, 3, 2)) * r).sum(), x, create_graph=True)
        return torch.autograd.grad(gx, x, v)[0]

    torch.testing.assert_close(hvp(True), hvp(False), rtol=1e-12, atol=1e-12)


def test_inputs_it_does_not_handle_go_to_the_stock_operator():
    with pool_rules() as rules:
        F.max_pool2d(torch.randn(2, 4, 6, 6), 2)  # fewer than 8 channels
        F.max_pool2d(torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last), 2)  # already channels-last
        F.max_pool2d(torch.randn(8, 6, 6), 2)  # unbatched
        F.max_pool2d(torch.randn(2, 8, 6, 6).transpose(2, 3), 2)  # strided
    assert rules.calls == 0


def test_bad_arguments_get_the_stock_error():
    x = torch.randn(2, 8, 2, 2)  # a window larger than the input
    with pytest.raises(RuntimeError) as stock:
        F.max_pool2d(x, 3)
    with pool_rules(), pytest.raises(RuntimeError) as ours:
        F.max_pool2d(x, 3)
    assert str(ours.value).splitlines()[0] == str(stock.value).splitlines()[0]


def test_traced_graph_is_rewritten_and_gives_the_same_results():
    x = torch.randn(4, 16, 13, 13)

    def f(x):
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2])
        return out * 2, idx

    gm = make_fx(f, tracing_mode="fake")(x)
    assert pool_channels_last(gm) == 1
    clones = [n for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 3  # the input to channels-last, both outputs back
    out, idx = gm(x)
    ref_out, ref_idx = f(x)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    assert out.is_contiguous() and idx.is_contiguous()
    assert pool_channels_last(make_fx(f, tracing_mode="fake")(torch.randn(4, 4, 13, 13))) == 0  # 4 channels


def test_the_linearised_convnet_trace_uses_it():
    from commentaries_ext.engine import FunctionalModule, NeumannConfig, implicit_hypergradient
    from commentaries_ext.engine import linearize

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 3)).double().train()
    fm = FunctionalModule(net)
    x, y = torch.randn(6, 1, 12, 12, dtype=torch.float64), torch.randint(0, 3, (6,))
    hp = {"s": torch.tensor(0.0, dtype=torch.float64)}

    def train_loss(p, h, b):
        return F.cross_entropy(fm(p, b[0]), b[1]) * h["s"].exp()

    def val_loss(p, h, b):
        return F.cross_entropy(fm(p, b[0]), b[1])

    kw = dict(solver=NeumannConfig(K=3, alpha=1e-2))
    got = implicit_hypergradient(train_loss, val_loss, fm.params(), hp, (x, y), (x, y), hvp="forward_over_reverse", **kw)
    traced = [t for t in linearize._FALLBACK_CACHE.values() if getattr(t, "pooled_channels_last", 0)]
    ref = implicit_hypergradient(train_loss, val_loss, fm.params(), hp, (x, y), (x, y), hvp="double_backward", **kw)
    torch.testing.assert_close(got.grads["s"], ref.grads["s"], rtol=1e-9, atol=1e-12)
    assert traced, "the trace's max-pool was not rewritten"
