"""BPTT engine: differentiable optimisers vs torch.optim, meta-gradients vs a
hand-unrolled autograd reference and central finite differences (float64)."""
import pytest
import torch
from torch import nn

from commentaries_ext.engine import SGD, Adam, FunctionalModule, from_torch, unroll

DT = torch.float64

OPTS = {
    "sgd": dict(cls=torch.optim.SGD, kw=dict(lr=0.1)),
    "sgd_wd": dict(cls=torch.optim.SGD, kw=dict(lr=0.1, weight_decay=0.01)),
    "momentum": dict(cls=torch.optim.SGD, kw=dict(lr=0.05, momentum=0.9, dampening=0.1)),
    "nesterov": dict(cls=torch.optim.SGD, kw=dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": dict(cls=torch.optim.Adam, kw=dict(lr=1e-2)),
    "adam_wd_ams": dict(cls=torch.optim.Adam, kw=dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, amsgrad=True)),
}


def make_net(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 6), nn.Tanh()] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(DT)


def batches(T, seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for _ in range(T)]


@pytest.mark.parametrize("name", list(OPTS))
def test_inner_optimizer_matches_torch_optim(name):
    net = make_net(1, bn=True).train()
    ref = make_net(1, bn=True).train()
    opt = OPTS[name]["cls"](ref.parameters(), **OPTS[name]["kw"])
    fm = FunctionalModule(net)
    spec = from_torch(opt)
    bs = batches(6, 1)

    def loss_fn(p, buf, h, b):
        out, nb = fm.call_update(p, buf, b[0])
        return nn.functional.cross_entropy(out, b[1]), nb

    params, buffers = fm.params(), fm.buffers()
    state = spec.init(params)
    for b in bs:
        res = unroll(loss_fn, params, spec, [b], buffers=buffers, opt_state=state)
        params, buffers, state = res.params, res.buffers, res.opt_state
        opt.zero_grad()
        nn.functional.cross_entropy(ref(b[0]), b[1]).backward()
        opt.step()
        for k, v in ref.named_parameters():
            assert torch.allclose(params[k], v, rtol=1e-12, atol=1e-13), (name, k)
        for k, v in ref.named_buffers():
            assert torch.allclose(buffers[k].to(v.dtype), v, rtol=1e-12, atol=1e-13), (name, k)


def weighted_setup(opt_name, T=4, seed=0, bn=False):
    net = make_net(seed, bn=bn)
    fm = FunctionalModule(net)
    bs = batches(T, seed)
    xv, yv = batches(1, seed + 100, n=16)[0]
    g = torch.Generator().manual_seed(seed)
    phi0 = 0.3 * torch.randn(T, 8, generator=g, dtype=DT)  # one weight per example per step

    step = {"i": 0}

    def loss_fn(p, buf, h, b):
        x, y, i = b
        w = torch.sigmoid(h["phi"][i])
        return (w * nn.functional.cross_entropy(fm(p, x), y, reduction="none")).mean()

    bs = [(x, y, i) for i, (x, y) in enumerate(bs)]
    spec = {"sgd": SGD(lr=0.3), "momentum": SGD(lr=0.2, momentum=0.9), "adam": Adam(lr=0.05)}[opt_name]

    def meta_loss(phi, truncate=None, checkpoint=None):
        res = unroll(loss_fn, fm.params(), spec, bs, hparams={"phi": phi}, truncate=truncate, checkpoint=checkpoint)
        return nn.functional.cross_entropy(fm(res.params, xv), yv)

    def hand(phi, truncate=None):
        """Hand-unrolled reference with plain autograd on nn.Parameters."""
        ref = make_net(seed, bn=bn)
        ps = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
        names = [n for n, _ in ref.named_parameters()]
        m = [torch.zeros_like(p) for p in ps]
        v = [torch.zeros_like(p) for p in ps]
        for t, (x, y, i) in enumerate(bs):
            track = truncate is None or t >= T - truncate
            if not track:
                ps = [p.detach().requires_grad_(True) for p in ps]
                m = [a.detach() for a in m]
                v = [a.detach() for a in v]
            w = torch.sigmoid(phi[i])
            out = torch.func.functional_call(ref, dict(zip(names, ps)), (x,))
            L = (w * nn.functional.cross_entropy(out, y, reduction="none")).mean()
            gs = torch.autograd.grad(L, ps, create_graph=track)
            if opt_name == "sgd":
                ps = [p - 0.3 * g for p, g in zip(ps, gs)]
            elif opt_name == "momentum":
                m = [g if t == 0 else 0.9 * b + g for b, g in zip(m, gs)]
                ps = [p - 0.2 * b for p, b in zip(ps, m)]
            else:
                m = [0.9 * a + 0.1 * g for a, g in zip(m, gs)]
                v = [0.999 * a + 0.001 * g * g for a, g in zip(v, gs)]
                mh = [a / (1 - 0.9 ** (t + 1)) for a in m]
                vh = [a / (1 - 0.999 ** (t + 1)) for a in v]
                ps = [p - 0.05 * a / (b.sqrt() + 1e-8) for p, a, b in zip(ps, mh, vh)]
        out = torch.func.functional_call(ref, dict(zip(names, ps)), (xv,))
        return nn.functional.cross_entropy(out, yv)

    return phi0, meta_loss, hand


@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
def test_bptt_matches_hand_unrolled_and_finite_differences(opt_name, bn):
    # bn: BatchNorm1d in training mode (batch statistics) inside every differentiated step
    phi0, meta_loss, hand = weighted_setup(opt_name, bn=bn)
    phi = phi0.clone().requires_grad_(True)
    g = torch.autograd.grad(meta_loss(phi), phi)[0]
    phi_h = phi0.clone().requires_grad_(True)
    gh = torch.autograd.grad(hand(phi_h), phi_h)[0]
    assert torch.allclose(g, gh, rtol=1e-9, atol=1e-13)
    # central finite differences along a few coordinates and a random direction
    eps = 1e-5
    with torch.no_grad():
        for idx in [(0, 0), (1, 3), (3, 7)]:
            e = torch.zeros_like(phi0)
            e[idx] = eps
            fd = (meta_loss(phi0 + e) - meta_loss(phi0 - e)) / (2 * eps)
            assert abs(float(fd) - float(g[idx])) <= 1e-7 + 1e-5 * abs(float(fd)), (idx, float(fd), float(g[idx]))
        d = torch.randn_like(phi0)
        fd = (meta_loss(phi0 + eps * d) - meta_loss(phi0 - eps * d)) / (2 * eps)
        assert abs(float(fd) - float((g * d).sum())) <= 1e-7 + 1e-5 * abs(float(fd))


@pytest.mark.parametrize("k", [1, 2])
def test_truncation_matches_hand_truncated(k):
    phi0, meta_loss, hand = weighted_setup("momentum", T=4, seed=2)
    phi = phi0.clone().requires_grad_(True)
    g = torch.autograd.grad(meta_loss(phi, truncate=k), phi)[0]
    phi_h = phi0.clone().requires_grad_(True)
    gh = torch.autograd.grad(hand(phi_h, truncate=k), phi_h, allow_unused=True)[0]
    assert torch.allclose(g, gh, rtol=1e-9, atol=1e-13)
    assert torch.all(g[: 4 - k] == 0) and g[4 - k :].abs().sum() > 0


@pytest.mark.parametrize("seg", [1, 3])
def test_checkpointing_gives_the_same_metagradient(seg):
    phi0, meta_loss, hand = weighted_setup("adam", T=5, seed=3)
    phi = phi0.clone().requires_grad_(True)
    g0 = torch.autograd.grad(meta_loss(phi), phi)[0]
    g1 = torch.autograd.grad(meta_loss(phi, checkpoint=seg), phi)[0]
    assert torch.allclose(g0, g1, rtol=1e-10, atol=1e-14)


def test_lr_as_differentiable_hyperparameter():
    net = make_net(4)
    fm = FunctionalModule(net)
    bs = batches(3, 4)
    xv, yv = batches(1, 5)[0]

    def loss_fn(p, buf, h, b):
        return nn.functional.cross_entropy(fm(p, b[0]), b[1])

    def meta(lr):
        res = unroll(loss_fn, fm.params(), SGD(lr=lr, momentum=0.5), bs)
        return nn.functional.cross_entropy(fm(res.params, xv), yv)

    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    g = torch.autograd.grad(meta(lr), lr)[0]
    with torch.no_grad():
        fd = (meta(lr + 1e-6) - meta(lr - 1e-6)) / 2e-6
    assert abs(float(g) - float(fd)) < 1e-6
