"""Differential fuzz of the engine's Hessian-vector products on random small students.

Every drawn student (convolutions with random geometry and padding mode, BatchNorm in
training or eval mode, activations, pooling, either memory format) is a float64 loss
weighted by a hyper-parameter; the linearised forward-over-reverse operator and ``auto``
must give the double-backward gradient, products and mixed term, or (forward-over-reverse
only) refuse with an exception: never a wrong number. A session-22 fuzz of this kind found
circular padding's in-place writes lost by the trace's split (test_engine_implicit.py).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from commentaries_ext.engine import FunctionalModule, make_operator
from commentaries_ext.engine import hvp as H
from commentaries_ext.engine import linearize as LZ

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, lambda: nn.LeakyReLU(0.3)]


def _student(data, channels: int, size: int) -> nn.Module:
    layers, c = [], channels
    for _ in range(data.draw(st.integers(1, 3), label="blocks")):
        out = data.draw(st.integers(1, 4), label="out channels")
        k = data.draw(st.integers(1, 3), label="kernel")
        stride = data.draw(st.sampled_from([1, 2]), label="stride")
        dilation = data.draw(st.sampled_from([1, 2]), label="dilation")
        mode = data.draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]), label="padding mode")
        padding = data.draw(st.sampled_from([0, 1] + (["same"] if stride == 1 else [])), label="padding")
        groups = data.draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and out % g == 0]), label="groups")
        layers.append(nn.Conv2d(c, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                padding_mode=mode, bias=data.draw(st.booleans(), label="bias")))
        c = out
        if data.draw(st.booleans(), label="batch norm"):
            layers.append(nn.BatchNorm2d(c, affine=data.draw(st.booleans(), label="affine")))
        layers.append(data.draw(st.sampled_from(ACTIVATIONS), label="activation")())
        pool = data.draw(st.sampled_from(["none", "max", "avg"]), label="pool")
        if pool == "max":
            layers.append(nn.MaxPool2d(2, ceil_mode=data.draw(st.booleans(), label="ceil")))
        elif pool == "avg":
            layers.append(nn.AvgPool2d(2, ceil_mode=data.draw(st.booleans(), label="ceil")))
    if data.draw(st.booleans(), label="global average pool"):
        layers.append(nn.AdaptiveAvgPool2d(1))
    net = nn.Sequential(*layers, nn.Flatten()).double().eval()
    try:
        with torch.no_grad():
            width = net(torch.zeros(2, channels, size, size, dtype=torch.float64)).shape[1]
    except RuntimeError:  # a geometry that shrinks the image away
        assume(False)
    return nn.Sequential(*net, nn.Linear(width, 3).double())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_linearised_products_match_double_backward_or_refuse(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    channels, size = data.draw(st.integers(1, 3), label="channels"), data.draw(st.integers(4, 7), label="size")
    net = _student(data, channels, size)
    for i, m in enumerate(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        m.train(data.draw(st.booleans(), label=f"batch norm {i} in training mode"))
    x = torch.randn(3, channels, size, size, dtype=torch.float64)
    if data.draw(st.booleans(), label="channels last"):
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 2, 1])
    fm = FunctionalModule(net)
    params = fm.params()
    hp = {"w": torch.rand(3, dtype=torch.float64) + 0.5}

    def loss(p, h, b):
        return (F.cross_entropy(fm(p, b[0]), b[1], reduction="none") * h["w"]).mean()

    v = [torch.randn_like(t) for t in params.values()]
    u = [torch.randn_like(t) for t in params.values()]
    ref = make_operator(loss, params, hp, (x, y), hvp="double_backward")
    want = ref.grad(), ref.matvec(v), ref.matvec(u), ref.mixed(v)

    def check(op):
        got = op.grad(), op.matvec(v), op.matvec(u), op.mixed(v)
        for a_list, b_list in zip(got, want):
            a_list = list(a_list.values()) if isinstance(a_list, dict) else list(a_list)
            b_list = list(b_list.values()) if isinstance(b_list, dict) else list(b_list)
            for a, b in zip(a_list, b_list):
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)

    for hvp in ("forward_over_reverse", "auto"):
        LZ.clear_cache()  # each drawn student traced afresh, with no decision left from the last one
        H._AUTO_BROKEN.clear()
        H._FEW_PRODUCTS_LINEARIZED.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                first = make_operator(loss, params, hp, (x, y), hvp=hvp)
            except Exception:  # forward-over-reverse may refuse a student; auto must not
                if hvp == "auto":
                    raise
                continue
            check(first)
            # a cache hit (not validated) after the allocator handed out and took back dirty blocks
            junk = [torch.full((2048,), 1e3, dtype=torch.float64) for _ in range(64)]
            del junk
            check(make_operator(loss, params, hp, (x, y), hvp=hvp))
