"""engine/conv.py: convolution gradients by matmul + col2im inside graphs differentiated
twice -- values and first, second and third derivatives against the stock operator
(float64), the per-shape choice, and the skipped input gradient."""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commentaries_ext.engine import conv as C

DT = torch.float64
# the last two leave input rows/columns that no window reaches (col2im must still give the input's size)
CONFS = [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 1)), ((2, 2), (1, 0), (2, 1)), ((2, 2), (0, 0), (1, 1)),
         ((3, 2), (0, 1), (1, 2))]


@pytest.fixture
def fold_always(monkeypatch):
    monkeypatch.setattr(C, "fold_is_faster", lambda key: True)


def _inputs(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 7, 6, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=DT, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("conf", CONFS)
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "oneDNN"])
def test_rules_gradcheck_gradgradcheck(conf, fold, monkeypatch):
    monkeypatch.setattr(C, "fold_is_faster", lambda key: fold)
    x, w, b = _inputs()
    f = lambda x, w, b: C.Conv2dRules.apply(x, w, b, conf)  # noqa: E731
    assert torch.equal(f(x, w, b), F.conv2d(x, w, b, *conf))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("conf", CONFS)
def test_third_derivatives_match_the_stock_operator(conf, fold_always):
    # the outer gradient of a squared gradient norm: what backpropagation through training takes
    x, w, b = _inputs(1)

    def meta(conv):
        L = (conv(x, w, b) ** 2).sum()
        g = torch.autograd.grad(L, (x, w), create_graph=True)
        M = sum((gi * gi).sum() for gi in g)
        gg = torch.autograd.grad(M, (x, w, b), create_graph=True)
        return sum((t * t).sum() for t in gg), gg

    (ours, g_ours), (ref, g_ref) = meta(lambda *a: C.Conv2dRules.apply(*a, conf)), meta(lambda *a: F.conv2d(*a, *conf))
    for a, r in zip(g_ours, g_ref):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12 * float(r.detach().abs().max()))
    t_ours, t_ref = torch.autograd.grad(ours, (x, w)), torch.autograd.grad(ref, (x, w))
    for a, r in zip(t_ours, t_ref):
        assert torch.allclose(a, r, rtol=1e-11, atol=1e-11 * float(r.abs().max()))


def test_mode_routes_conv2d_and_leaves_the_rest(fold_always):
    x, w, b = _inputs(2)
    with C.conv_rules() as mode:
        y = F.conv2d(x, w, b, 2, 1)
        assert "Conv2dRules" in type(y.grad_fn).__name__
        F.conv2d(x, torch.randn(4, 2, 3, 3, dtype=DT), None, 1, "same")  # string padding: the stock operator
        F.conv2d(x, torch.randn(4, 1, 3, 3, dtype=DT), None, 1, 0, 1, 2)  # groups: stock
        with torch.no_grad():
            F.conv2d(x, w, b)  # no graph to build: stock
        F.conv2d(x.detach(), w, b)  # no input gradient to speed up: stock
        nn.Conv2d(2, 3, 3).to(DT)(x)  # a module goes through F.conv2d
    assert mode.calls == 2


def test_input_gradient_is_skipped_when_the_backward_does_not_use_it(fold_always, monkeypatch):
    # the input depends on something that requires grad, but autograd.grad asks for the weight only
    calls = []
    orig = C._input_grad
    monkeypatch.setattr(C, "_input_grad", lambda *a: calls.append(1) or orig(*a))
    x, w, b = _inputs(3)
    s = torch.ones(3, 1, 1, 1, dtype=DT, requires_grad=True)
    with C.conv_rules():
        gw, = torch.autograd.grad(F.conv2d(x.detach() * s, w, b).square().sum(), (w,), create_graph=True)
    assert not calls
    torch.autograd.grad(gw.square().sum(), (s,))  # the outer backward needs the input path
    assert len(calls) == 2  # the forward conv's and the weight gradient's (its reverse rule)


def test_choice_is_timed_once_per_shape(monkeypatch):
    monkeypatch.setattr(C, "_FOLD_FASTER", {})
    key = ((2, 4, 5, 5), (2, 2, 7, 7), (4, 2, 3, 3), torch.float32, (1, 1), (0, 0), (1, 1))
    first = C.fold_is_faster(key)
    assert C._FOLD_FASTER == {key: first}
    monkeypatch.setattr(C, "input_grad_by_fold", None)  # a second timing would call it
    assert C.fold_is_faster(key) == first


def test_bptt_through_conv_pool_batchnorm_matches_stock_autograd(fold_always, monkeypatch):
    from commentaries_ext.engine import Adam, FunctionalModule, unroll

    U = importlib.import_module("commentaries_ext.engine.unroll")
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 2 * 2, 3)).to(DT).train()
    fm = FunctionalModule(net)
    g = torch.Generator().manual_seed(5)
    bs = [(torch.randn(6, 1, 9, 9, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    xv, yv = torch.randn(6, 1, 9, 9, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)

    def loss_fn(p, buf, h, b):
        out, nb = fm.call_update(p, buf, b[0] * torch.sigmoid(h["phi"]))  # the input depends on phi
        return F.cross_entropy(out, b[1]), nb

    def meta_grad():
        phi = torch.zeros(1, 1, 9, 9, dtype=DT, requires_grad=True)
        res = unroll(loss_fn, fm.params(), Adam(lr=0.05), bs, hparams={"phi": phi}, buffers=fm.buffers())
        return torch.autograd.grad(F.cross_entropy(fm(res.params, xv), yv), phi)[0]

    ours = meta_grad()
    monkeypatch.setattr(U, "rules", lambda *modes: contextlib.nullcontext())  # every rule off: stock autograd
    ref = meta_grad()
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-13 * float(ref.abs().max()))


@pytest.mark.parametrize("case", ["channels_last", "batch1", "weight_no_grad", "keywords", "one_element_tuples"])
def test_rules_in_the_mode_match_stock_autograd(case, fold_always):
    # second-order meta-gradient through the mode against the stock operator, for input variants
    x, w, b = _inputs(6)
    if case == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    if case == "batch1":
        x = x.detach()[:1].requires_grad_()
    if case == "weight_no_grad":
        w = w.detach()

    def conv(x, w, b):
        if case == "keywords":
            return F.conv2d(input=x, weight=w, bias=b, stride=2, padding=(1, 0), dilation=1)
        if case == "one_element_tuples":
            return F.conv2d(x, w, b, (2,), (1,))
        return F.conv2d(x, w, b, 2, 1)

    def meta(mode):
        with mode:
            y = conv(x, w, b)
            ins = [t for t in (x, w) if t.requires_grad]
            g = torch.autograd.grad((y ** 2).sum(), ins, create_graph=True)
        return torch.autograd.grad(sum((gi * gi).sum() for gi in g), [x] + ([w] if w.requires_grad else []))

    with C.conv_rules() as m:
        pass
    ours = meta(m)
    assert m.calls == 1
    ref = meta(contextlib.nullcontext())
    for a, r in zip(ours, ref):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12 * float(r.abs().max()))


def test_mode_passes_through_torch_func():
    # classic autograd.Functions have no vmap/jvp rules: under torch.func the stock operator runs
    x, w, b = _inputs(7)
    with C.conv_rules() as mode:
        gx = torch.func.grad(lambda t: F.conv2d(t, w.detach(), None).square().sum())(x.detach())
    assert mode.calls == 0
    assert torch.allclose(gx, torch.autograd.grad(F.conv2d(x, w.detach()).square().sum(), x)[0])


def test_no_timing_under_deterministic_algorithms_and_choices_travel_with_checkpoints(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the choice is convolution_backward, untimed
    (a timed choice changed the rounding between runs: a BPTT commentary 0.02 apart after 3 outer
    steps), and the timed choices are saved and restored by checkpoint.rng_state."""
    from commentaries_ext import checkpoint

    monkeypatch.setattr(C, "_FOLD_FASTER", {})
    key = ((2, 4, 5, 5), (2, 2, 7, 7), (4, 2, 3, 3), torch.float32, (1, 1), (0, 0), (1, 1))
    monkeypatch.setattr(C, "input_grad_by_fold", None)  # timing would call it
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert C.fold_is_faster(key) is False and C._FOLD_FASTER == {}
    finally:
        torch.use_deterministic_algorithms(det)
    C._FOLD_FASTER[key] = True
    st = checkpoint.rng_state()
    C._FOLD_FASTER.clear()
    checkpoint.set_rng_state(st)
    assert C._FOLD_FASTER == {key: True}
