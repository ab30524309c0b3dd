"""engine/activation.py: the mask-keeping ReLU -- values, first and second derivatives
against the stock operator (float64), what its graph keeps, and the mode's routing; and the
max-pool rule no longer keeping its input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commentaries_ext.engine.activation import ReluMask, relu_rules
from commentaries_ext.engine.pooling import MaxPool2dChannelsLast

DT = torch.float64


def _saved(fn):
    """The tensors autograd keeps while building fn()'s graph."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, kept


def test_relu_mask_gradcheck_gradgradcheck_and_values():
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    x.data[0, :2] = 0.0  # the kink: gradient 0 there, as threshold_backward
    assert torch.equal(ReluMask.apply(x), torch.relu(x))
    assert torch.autograd.gradcheck(ReluMask.apply, (x.detach()[1:].clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(ReluMask.apply, (x.detach()[1:].clone().requires_grad_(),))
    g = torch.randn_like(x)
    ours, = torch.autograd.grad(ReluMask.apply(x), x, g)
    ref, = torch.autograd.grad(torch.relu(x), x, g)
    assert torch.equal(ours, ref)


def test_relu_mask_nan_and_inf_as_the_stock_operator():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 2.0], dtype=DT, requires_grad=True)
    g = torch.arange(1.0, 7.0, dtype=DT)
    ours, = torch.autograd.grad(ReluMask.apply(x), x, g)
    ref, = torch.autograd.grad(torch.relu(x), x, g)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.isnan(ReluMask.apply(x)), torch.isnan(torch.relu(x)))


def test_relu_mask_keeps_a_bool_mask_not_its_output():
    x = torch.randn(8, 16, dtype=torch.float32, requires_grad=True)
    _, kept = _saved(lambda: ReluMask.apply(x))
    assert [t.dtype for t in kept] == [torch.bool]
    _, kept = _saved(lambda: torch.relu(x))
    assert [t.dtype for t in kept] == [torch.float32]  # the stock operator keeps its float output


def test_double_backward_through_the_mode_matches_stock():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    x = torch.randn(5, 6, dtype=DT)
    ps = list(net.parameters())

    def meta(mode):
        with mode:
            g = torch.autograd.grad(net(x).square().sum(), ps, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in g), ps)

    with relu_rules() as mode:
        pass
    ours = meta(mode)
    assert mode.calls == 1
    import contextlib

    for a, r in zip(ours, meta(contextlib.nullcontext())):
        assert torch.allclose(a, r, rtol=1e-13, atol=1e-15)


def test_mode_routing():
    x = torch.randn(3, 4, requires_grad=True)
    with relu_rules() as mode:
        assert "ReluMask" in type(F.relu(x).grad_fn).__name__
        assert "ReluMask" in type(torch.relu(x).grad_fn).__name__
        F.relu(x.detach().clone(), inplace=True)  # in place: stock
        F.relu(x.detach())  # nothing to differentiate: stock
        with torch.no_grad():
            F.relu(x)
        torch.func.grad(lambda t: F.relu(t).sum())(x.detach())  # under torch.func: stock
    assert mode.calls == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_pool_keeps_only_its_indices(dtype):
    x = torch.randn(2, 8, 9, 9, dtype=dtype, requires_grad=True)
    (out, idx), kept = _saved(lambda: MaxPool2dChannelsLast.apply(x, [3, 3], [2, 2], [0, 0], [1, 1], False))
    assert [t.dtype for t in kept] == [torch.int64]
    g = torch.randn_like(out, requires_grad=True)
    ours, = torch.autograd.grad(out, x, g, create_graph=True)
    ref_out = F.max_pool2d(x, 3, 2)
    ref, = torch.autograd.grad(ref_out, x, g, create_graph=True)
    assert torch.equal(ours, ref) and ours.is_contiguous()
    gg = torch.randn_like(ours)
    assert torch.equal(torch.autograd.grad(ours, g, gg)[0], torch.autograd.grad(ref, g, gg)[0])
