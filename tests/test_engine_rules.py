"""engine/rules.py: several rule modes as one TorchFunctionMode -- each handled function reaches
its mode, the rest pass straight through, and the result is that of the stacked modes."""
import pytest
import torch
import torch.nn.functional as F

from commentaries_ext.engine.activation import relu_rules
from commentaries_ext.engine.batchnorm import batch_norm_reverse_rules
from commentaries_ext.engine.conv import conv_rules
from commentaries_ext.engine.pooling import pool_rules
from commentaries_ext.engine.rules import rules

DT = torch.float64


def _second_order(mode_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 12, 12, generator=g, dtype=DT, requires_grad=True)
    w1 = torch.randn(8, 1, 3, 3, generator=g, dtype=DT, requires_grad=True)
    bn_w, bn_b = (torch.randn(8, generator=g, dtype=DT, requires_grad=True) for _ in range(2))
    ps = [x, w1, bn_w, bn_b]
    modes, ctx = mode_factory()
    with ctx:
        h = F.conv2d(x, w1, None, 1, 1)
        h = F.batch_norm(h, None, None, bn_w, bn_b, training=True)
        h = F.max_pool2d(F.relu(h), 2)
        loss = torch.tanh(h).square().sum()
        gs = torch.autograd.grad(loss, ps, create_graph=True)
    return torch.autograd.grad(sum((t * t).sum() for t in gs), ps), modes


def test_one_mode_for_several_matches_the_stacked_modes(monkeypatch):
    import commentaries_ext.engine.conv as C

    monkeypatch.setattr(C, "fold_is_faster", lambda key: True)  # route the convolution whatever the timing
    def combined():
        modes = (pool_rules(), conv_rules(), relu_rules(), batch_norm_reverse_rules())
        return modes, rules(*modes)

    def stacked():
        import contextlib

        modes = (pool_rules(), conv_rules(), relu_rules(), batch_norm_reverse_rules())
        stack = contextlib.ExitStack()
        for m in modes:
            stack.enter_context(m)
        return modes, stack

    ours, modes = _second_order(combined)
    ref, ref_modes = _second_order(stacked)
    assert [m.calls for m in modes] == [m.calls for m in ref_modes]
    assert all(m.calls == 1 for m in modes)  # each rule was routed
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12 * float(r.abs().max()))


def test_unhandled_calls_pass_through_and_overlaps_are_refused():
    x = torch.randn(3, 4)
    with rules(relu_rules()) as mode:
        assert torch.equal(torch.tanh(x), x.tanh())
        assert torch.equal(F.softmax(x, 1), x.softmax(1))
    assert mode.modes[0].calls == 0  # relu_rules only takes inputs that need a gradient
    with pytest.raises(ValueError, match="handled by two modes"):
        rules(relu_rules(), relu_rules())
