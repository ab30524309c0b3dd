"""BPTT engine: differentiable optimisers vs torch.optim, meta-gradients vs a
hand-unrolled autograd reference and central finite differences (float64)."""
import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
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
    # decoupled weight decay (from_torch once turned these into Adam's coupled L2 decay)
    "adamw": dict(cls=torch.optim.AdamW, kw=dict(lr=1e-2, weight_decay=0.5)),
    "adamw_ams": dict(cls=torch.optim.AdamW, kw=dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.3, amsgrad=True)),
    "adam_decoupled": dict(cls=torch.optim.Adam, kw=dict(lr=1e-2, weight_decay=0.5, decoupled_weight_decay=True)),
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
    spec = {"sgd": lambda: SGD(lr=0.3), "momentum": lambda: SGD(lr=0.2, momentum=0.9), "adam": lambda: Adam(lr=0.05),
            "adamw": lambda: Adam(lr=0.05, weight_decay=0.3, decoupled_weight_decay=True)}[opt_name]()

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
                if opt_name == "adamw":  # decoupled: shrink p before the update, the moments see plain g
                    ps = [p * (1 - 0.05 * 0.3) for p in ps]
                m = [0.9 * a + 0.1 * g for a, g in zip(m, gs)]
                v = [0.999 * a + 0.001 * g * g for a, g in zip(v, gs)]
                mh = [a / (1 - 0.9 ** (t + 1)) for a in m]
                vh = [a / (1 - 0.999 ** (t + 1)) for a in v]
                ps = [p - 0.05 * a / (b.sqrt() + 1e-8) for p, a, b in zip(ps, mh, vh)]
        out = torch.func.functional_call(ref, dict(zip(names, ps)), (xv,))
        return nn.functional.cross_entropy(out, yv)

    return phi0, meta_loss, hand


@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam", "adamw"])
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


@pytest.mark.parametrize("seg", [1, 2])
def test_checkpointing_replays_the_dropout_masks_of_the_forward(seg):
    # the backward re-runs each segment: it once drew new masks, so the meta-gradient was that of
    # another trajectory than the one whose loss it differentiated
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT).train()
    fm = FunctionalModule(net)
    bs = [(x, y, i) for i, (x, y) in enumerate(batches(4, seed=5))]
    xv, yv = batches(1, seed=6)[0]

    def loss_fn(p, buf, h, b):
        x, y, i = b
        return (torch.sigmoid(h["phi"][i]) * nn.functional.cross_entropy(fm(p, x), y, reduction="none")).mean()

    def meta_grad(checkpoint):
        phi = torch.zeros(4, 8, dtype=DT, requires_grad=True)
        torch.manual_seed(1)
        res = unroll(loss_fn, fm.params(), Adam(lr=0.05), bs, hparams={"phi": phi}, checkpoint=checkpoint)
        val = nn.functional.cross_entropy(fm(res.params, xv), yv)  # (its own mask, the same in both runs)
        g = torch.autograd.grad(val, phi)[0]
        return g, torch.rand(1)  # the backward's re-run leaves the global stream where it was

    g0, after0 = meta_grad(None)
    g1, after1 = meta_grad(seg)
    assert g0.abs().sum() > 0
    assert torch.allclose(g0, g1, rtol=1e-10, atol=1e-14)
    assert torch.equal(after0, after1)


@pytest.mark.parametrize("checkpoint", [None, 2])
def test_steps_takes_only_the_batches_it_needs_from_an_endless_iterator(checkpoint):
    # unroll once drained the iterable before looking at steps (an endless stream hung); this
    # stream raises instead of going on forever past T + 5 items, so that the old code fails fast
    phi0, meta_loss, _ = weighted_setup("sgd", T=4, seed=5)
    data = batches(4, 5)
    net = make_net(5)
    fm = FunctionalModule(net)
    drawn = []

    def stream():
        while True:
            for i, (x, y) in enumerate(data):
                if len(drawn) >= len(data) + 5:
                    raise RuntimeError("unroll drained the stream")
                drawn.append(i)
                yield x, y, i

    def loss_fn(p, buf, h, b):
        x, y, i = b
        return (torch.sigmoid(h["phi"][i]) * nn.functional.cross_entropy(fm(p, x), y, reduction="none")).mean()

    phi = phi0.clone().requires_grad_(True)
    it = stream()
    res = unroll(loss_fn, fm.params(), SGD(lr=0.3), it, hparams={"phi": phi}, steps=3, checkpoint=checkpoint)
    assert drawn == [0, 1, 2] and res.info["steps"] == 3
    assert next(it)[2] == 3  # the iterator is left at the next batch
    ref = unroll(loss_fn, fm.params(), SGD(lr=0.3), [(x, y, i) for i, (x, y) in enumerate(data)],
                 hparams={"phi": phi}, steps=3)
    for k in ref.params:
        assert torch.equal(res.params[k], ref.params[k])
    g = torch.autograd.grad(sum(p.sum() for p in res.params.values()), phi)[0]
    gr = torch.autograd.grad(sum(p.sum() for p in ref.params.values()), phi)[0]
    assert torch.allclose(g, gr, rtol=1e-12, atol=1e-15) and g[:3].abs().sum() > 0 and torch.all(g[3] == 0)


@pytest.mark.parametrize("checkpoint", [None, 1])
def test_call_update_without_buffers_leaves_the_module_alone(checkpoint):
    # buffers= forgotten: call_update once let BatchNorm update the module's own running stats in
    # place; now the missing stats start from a copy of the module's, as if buffers=fm.buffers()
    net = make_net(8, bn=True).train()
    fm = FunctionalModule(net)
    before = {k: v.clone() for k, v in fm.buffers().items()}
    bs = batches(3, 8)
    phi0 = torch.zeros(3, dtype=DT)

    def loss_fn(p, buf, h, b):
        out, nb = fm.call_update(p, buf, b[0] * (1 + h["phi"][b[2]]))
        return nn.functional.cross_entropy(out, b[1]), nb

    bs = [(x, y, i) for i, (x, y) in enumerate(bs)]
    runs = []
    for given in (None, {k: v.clone() for k, v in before.items()}):
        phi = phi0.clone().requires_grad_(True)
        res = unroll(loss_fn, fm.params(), SGD(lr=0.2), bs, hparams={"phi": phi}, buffers=given, checkpoint=checkpoint)
        g = torch.autograd.grad(sum(p.sum() for p in res.params.values()), phi)[0]
        runs.append((res, g))
        for k, v in fm.buffers().items():
            assert torch.equal(v, before[k]), k
    (a, ga), (b, gb) = runs
    assert set(a.buffers) == set(before) and int(a.buffers["2.num_batches_tracked"]) == 3
    for k in before:
        assert torch.equal(a.buffers[k], b.buffers[k]), k
    assert torch.equal(ga, gb)


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


def test_adamw_tensor_lr_and_weight_decay_match_a_hand_unroll():
    # tensor hyperparameters take the generic (stock-op) Adam step, floats the fused node: both
    # against torch.optim.AdamW's update written out with create_graph in plain PyTorch
    net = make_net(6)
    fm = FunctionalModule(net)
    bs = batches(4, 6)
    xv, yv = batches(1, 7)[0]
    names = list(fm.params())

    def loss_fn(p, buf, h, b):
        return nn.functional.cross_entropy(fm(p, b[0]), b[1])

    def meta(lr, wd):
        res = unroll(loss_fn, fm.params(), Adam(lr=lr, betas=(0.8, 0.99), weight_decay=wd, decoupled_weight_decay=True), bs)
        return nn.functional.cross_entropy(fm(res.params, xv), yv)

    def hand(lr, wd):
        ps = [p.clone() for p in fm.params().values()]
        m = [torch.zeros_like(p) for p in ps]
        v = [torch.zeros_like(p) for p in ps]
        for t, (x, y) in enumerate(bs):
            ps = [p if p.requires_grad else p.requires_grad_() for p in ps]
            gs = torch.autograd.grad(loss_fn(dict(zip(names, ps)), None, None, (x, y)), ps, create_graph=True)
            ps = [p * (1 - lr * wd) for p in ps]
            m = [0.8 * a + 0.2 * g for a, g in zip(m, gs)]
            v = [0.99 * a + 0.01 * g * g for a, g in zip(v, gs)]
            ps = [p - lr / (1 - 0.8 ** (t + 1)) * a / (b.sqrt() / (1 - 0.99 ** (t + 1)) ** 0.5 + 1e-8)
                  for p, a, b in zip(ps, m, v)]
        return nn.functional.cross_entropy(fm(dict(zip(names, ps)), xv), yv)

    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    wd = torch.tensor(0.4, dtype=DT, requires_grad=True)
    L = meta(lr, wd)
    g = torch.autograd.grad(L, (lr, wd))
    gh = torch.autograd.grad(hand(lr, wd), (lr, wd))
    for a, b in zip(g, gh):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    assert torch.allclose(L, meta(0.05, 0.4).detach(), rtol=1e-12)  # the fused path's trajectory
    with torch.no_grad():
        fd = (meta(lr + 1e-6, wd) - meta(lr - 1e-6, wd)) / 2e-6
    assert abs(float(g[0]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


# ----------------------------------------------------------------- the fused Adam node


def _adam_inputs(k=3, seed=0, zero_v=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (2, 1, 3)][:k]
    p = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    gr = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    m = [0.1 * torch.randn(s, generator=g, dtype=DT) for s in shapes]
    v = [torch.rand(s, generator=g, dtype=DT) + 0.1 for s in shapes]
    if zero_v:  # entries whose v' is 0: sqrt is not differentiable there (derivative taken as 0)
        gr[0][:2] = 0
        v[0][:2] = 0
        m[0][:2] = 0
    return p, gr, m, v


def _generic_adam(opt, params, grads, state):
    import importlib

    U = importlib.import_module("commentaries_ext.engine.unroll")
    orig = U._fused_adam_applies
    U._fused_adam_applies = lambda *a: False
    try:
        return opt.step(params, grads, state)
    finally:
        U._fused_adam_applies = orig


@pytest.mark.parametrize("zero_v", [False, True])
def test_fused_adam_node_gradcheck_and_matches_the_generic_graph(zero_v):
    from commentaries_ext.engine.unroll import _AdamStep

    p, gr, m, v = _adam_inputs(zero_v=zero_v)
    hp = (0.05, 0.8, 0.99, 1e-6, 1 - 0.8**3, 1 - 0.99**3)
    ts = [t.clone().requires_grad_() for t in p + gr + m + v]
    k = len(p)
    if not zero_v:  # gradcheck's finite differences cross sqrt's kink at v' = 0
        assert torch.autograd.gradcheck(lambda *t: _AdamStep.apply(hp, k, *t), ts)
        assert torch.autograd.gradgradcheck(lambda *t: _AdamStep.apply(hp, k, *t), ts)
    # against the stock-op graph of the generic step, on random cotangents (some outputs unused)
    opt = Adam(lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    names = [f"w{i}" for i in range(k)]
    state = {"step": 2, "m": dict(zip(names, ts[2 * k:3 * k])), "v": dict(zip(names, ts[3 * k:]))}
    params, grads = dict(zip(names, ts[:k])), dict(zip(names, ts[k:2 * k]))
    new_f, st_f = opt.step(params, grads, state)
    new_g, st_g = _generic_adam(opt, params, grads, state)
    assert "AdamStep" in type(new_f["w0"].grad_fn).__name__ and "AdamStep" not in type(new_g["w0"].grad_fn).__name__
    gen = torch.Generator().manual_seed(1)
    outs_f = [new_f[n] for n in names] + [st_f["m"]["w1"], st_f["v"]["w2"]]
    outs_g = [new_g[n] for n in names] + [st_g["m"]["w1"], st_g["v"]["w2"]]
    for a, b in zip(outs_f, outs_g):
        assert torch.allclose(a, b, rtol=1e-14, atol=1e-15)
    cot = [torch.randn(o.shape, generator=gen, dtype=DT) for o in outs_f]
    gf = torch.autograd.grad(outs_f, ts, cot, allow_unused=True, create_graph=True)
    gg = torch.autograd.grad(outs_g, ts, cot, allow_unused=True, create_graph=True)
    for i, (a, b) in enumerate(zip(gf, gg)):
        a = torch.zeros_like(ts[i]) if a is None else a
        b = torch.zeros_like(ts[i]) if b is None else b
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), i
    # second order (a double backward through the node), also where v' = 0
    sf = sum((a * a).sum() for a in gf if a is not None)
    sg = sum((b * b).sum() for b in gg if b is not None)
    hf = torch.autograd.grad(sf, ts, allow_unused=True)
    hg = torch.autograd.grad(sg, ts, allow_unused=True)
    for i, (a, b) in enumerate(zip(hf, hg)):
        a = torch.zeros_like(ts[i]) if a is None else a
        b = torch.zeros_like(ts[i]) if b is None else b
        assert torch.isfinite(a).all(), i
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), i


@pytest.mark.parametrize("opts", [dict(), dict(weight_decay=0.01), dict(maximize=True),
                                  dict(weight_decay=0.2, decoupled_weight_decay=True)])
def test_fused_adam_reference_backend_is_torch_optim_bit_for_bit(opts):
    # the reference kernels are torch.optim.Adam's own ops: the same float32 parameters over several steps
    from commentaries_ext import backend

    torch.manual_seed(3)
    ps = [torch.randn(7, 3), torch.randn(11)]
    ref = [p.clone().requires_grad_() for p in ps]
    topt = torch.optim.Adam(ref, lr=3e-2, **opts)
    spec = Adam(lr=3e-2, **opts)
    params = {str(i): p.clone() for i, p in enumerate(ps)}
    state = spec.init(params)
    with backend.use("reference"):
        for t in range(5):
            grads = {str(i): torch.randn_like(p) for i, p in enumerate(ps)}
            for i, r in enumerate(ref):
                r.grad = grads[str(i)].clone()
            topt.step()
            params, state = spec.step(params, grads, state)
            for i, r in enumerate(ref):
                assert torch.equal(params[str(i)], r.detach()), (t, i)


def _adam_lists(dtype, sizes, seed, zero_v=False):
    g = torch.Generator().manual_seed(seed)
    p, gr, m = ([torch.randn(n, generator=g, dtype=dtype) for n in sizes] for _ in range(3))
    v = [torch.rand(n, generator=g, dtype=dtype) for n in sizes]
    if zero_v:
        for t in (gr[0], m[0], v[0]):
            t[::3] = 0
    return p, gr, m, v


cpp_kernels = pytest.mark.skipif(not hasattr(torch.ops.commentaries_ext, "cpp_adam_step"),
                                 reason="compiled extension without the Adam kernels")


@cpp_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[1], [5, 16, 33], [40000, 7]], ids=["one", "odd", "chunks"])
def test_adam_step_cpp_kernel_against_float64(dtype, sizes):
    from commentaries_ext import backend

    p, g, m, v = _adam_lists(dtype, sizes, 7)
    hp = (3e-2, 0.8, 0.99, 1e-6, 1 - 0.8**4, 1 - 0.99**4)
    prev = backend.set_poison_outputs(True)
    try:
        outs = torch.ops.commentaries_ext.cpp_adam_step(p, g, m, v, *hp)
    finally:
        backend.set_poison_outputs(prev)
    from commentaries_ext.reference.solver import adam_step

    want = adam_step(*([t.double() for t in ts] for ts in (p, g, m, v)), *hp)
    tol = dict(rtol=4e-7, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-15, atol=1e-16)
    for got_list, want_list in zip(outs, want):
        for a, b in zip(got_list, want_list):
            assert a.dtype == dtype and torch.allclose(a.double(), b, **tol)


@cpp_kernels
@pytest.mark.parametrize("present", ["PMV", "P", "MV", "PV"])
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_adam_step_backward_cpp_kernel_against_the_reference(present, mask):
    from commentaries_ext.reference.solver import adam_step, adam_step_backward

    sizes = [37, 16, 5]
    p, g, m, v = _adam_lists(torch.float64, sizes, 8, zero_v=True)
    hp = (3e-2, 0.8, 0.99, 1e-6, 1 - 0.8**4, 1 - 0.99**4)
    _, m_new, v_new = adam_step(p, g, m, v, *hp)
    gen = torch.Generator().manual_seed(9)
    inc = {c: [torch.randn(n, generator=gen, dtype=torch.float64) if (c in present and i != 1) else None
               for i, n in enumerate(sizes)] for c in "PMV"}  # tensor 1 gets no incoming grad at all
    got = torch.ops.commentaries_ext.cpp_adam_step_backward(inc["P"], inc["M"], inc["V"], g, m_new, v_new, *hp,
                                                           list(mask))
    want = adam_step_backward(inc["P"], inc["M"], inc["V"], g, m_new, v_new, *hp, mask)
    for on, a_list, b_list in zip(mask, got, want):
        assert len(a_list) == (len(sizes) if on else 0) == len(b_list)
        for a, b in zip(a_list, b_list):
            assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-13, atol=1e-15)


@cpp_kernels
def test_adam_kernel_ops_opcheck():
    from torch.library import opcheck

    p, g, m, v = _adam_lists(torch.float64, [5, 6], 10)
    hp = (3e-2, 0.9, 0.999, 1e-8, 0.1, 0.001)
    opcheck(torch.ops.commentaries_ext.cpp_adam_step, (p, g, m, v, *hp))
    opcheck(torch.ops.commentaries_ext.cpp_adam_step_backward, (p, [None, m[1]], v, g, m, v, *hp, [True, False, True]))


def test_fused_adam_non_contiguous_tensors_take_the_reference():
    # a transposed parameter (or a channels-last gradient) breaks the C++ contract: same values anyway
    p, g, m, v = _adam_lists(torch.float64, [12], 11)
    pt = [p[0].view(3, 4).t()]  # non-contiguous
    gt, mt, vt = ([t[0].view(3, 4).t().contiguous()] for t in (g, m, v))
    spec = Adam(lr=0.05)
    state = {"step": 2, "m": {"w": mt[0]}, "v": {"w": vt[0]}}
    a, sa = spec.step({"w": pt[0]}, {"w": gt[0]}, state)
    b, sb = spec.step({"w": pt[0].contiguous()}, {"w": gt[0]}, state)
    # (reference vs C++ kernel: the same formula, rounding apart)
    assert torch.allclose(a["w"], b["w"], rtol=1e-15, atol=0)
    assert torch.allclose(sa["v"]["w"], sb["v"]["w"], rtol=1e-15, atol=0)


@pytest.mark.parametrize("case", ["bfloat16", "forced triton", "forward AD"])
def test_fused_adam_falls_back_where_the_kernels_do_not_apply(case):
    # the step worked before the fused node in each of these cases and still does, with the same values
    import torch.autograd.forward_ad as fwAD

    from commentaries_ext import backend

    dtype = torch.bfloat16 if case == "bfloat16" else DT
    p, g, m, v = (t.to(dtype) for t in (ts[0] for ts in _adam_lists(DT, [9], 12)))
    spec = Adam(lr=0.05)
    state = {"step": 1, "m": {"w": m}, "v": {"w": v}}
    want, _ = _generic_adam(spec, {"w": p}, {"w": g}, state)
    if case == "forward AD":
        with fwAD.dual_level():
            dual = fwAD.make_dual(g, torch.ones_like(g))
            new, _ = spec.step({"w": p}, {"w": dual}, state)
            got, tangent = fwAD.unpack_dual(new["w"])
        assert tangent is not None and torch.isfinite(tangent).all()
    else:
        with backend.use("triton") if case == "forced triton" else contextlib.nullcontext():
            new, _ = spec.step({"w": p}, {"w": g}, state)
        got = new["w"]
        assert "AdamStep" in type(got.grad_fn).__name__ if got.requires_grad else True
    assert got.dtype == dtype and torch.allclose(got.double(), want["w"].double(), rtol=1e-15, atol=0)


@cpp_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_step_backward_cpp_kernel_chunks_and_float32(dtype):
    from commentaries_ext.reference.solver import adam_step, adam_step_backward

    sizes = [40000, 3]  # over the 16384-element chunks, and a tail
    p, g, m, v = _adam_lists(dtype, sizes, 13, zero_v=True)
    hp = (3e-2, 0.9, 0.999, 1e-8, 1 - 0.9**2, 1 - 0.999**2)
    _, m_new, v_new = adam_step(p, g, m, v, *hp)
    gen = torch.Generator().manual_seed(14)
    inc = [[torch.randn(n, generator=gen, dtype=dtype) for n in sizes] for _ in range(3)]
    got = torch.ops.commentaries_ext.cpp_adam_step_backward(*inc, g, m_new, v_new, *hp, [True, True, True])
    want = adam_step_backward(*([t.double() for t in ts] for ts in inc), [t.double() for t in g],
                              [t.double() for t in m_new], [t.double() for t in v_new], *hp, (True, True, True))
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    for a_list, b_list in zip(got, want):
        for a, b in zip(a_list, b_list):
            assert torch.allclose(a.double(), b, **tol)


_adam_sizes = st.lists(st.sampled_from([1, 7, 16, 33, 16384 + 5]), min_size=1, max_size=3)


@cpp_kernels
@settings(max_examples=25, deadline=None)
@given(sizes=_adam_sizes, dtype=st.sampled_from((torch.float32, torch.float64)), seed=st.integers(0, 2**31 - 1),
       b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999), t=st.integers(1, 50), scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_adam_kernels_against_float64_on_random_inputs(sizes, dtype, seed, b1, b2, t, scale):
    # fresh random lists, outputs poisoned before the kernels write them; incoming grads with None entries
    from commentaries_ext import backend
    from commentaries_ext.reference.solver import adam_step, adam_step_backward

    p, g, m, v = _adam_lists(dtype, sizes, seed, zero_v=seed % 2 == 0)
    g = [x * scale for x in g]
    v = [x * scale * scale for x in v]
    hp = (1e-2, b1, b2, 1e-8, 1 - b1**t, 1 - b2**t)
    dbl = lambda xs: [x.double() for x in xs]  # noqa: E731
    gen = torch.Generator().manual_seed(seed + 1)
    inc = [[torch.randn(n, generator=gen, dtype=dtype) if (i + j) % 3 else None for i, n in enumerate(sizes)]
           for j in range(3)]
    prev = backend.set_poison_outputs(True)
    try:
        got_f = torch.ops.commentaries_ext.cpp_adam_step(p, g, m, v, *hp)
        _, m1, v1 = adam_step(p, g, m, v, *hp)
        got_b = torch.ops.commentaries_ext.cpp_adam_step_backward(*inc, g, m1, v1, *hp, [True, True, True])
    finally:
        backend.set_poison_outputs(prev)
    want_f = adam_step(dbl(p), dbl(g), dbl(m), dbl(v), *hp)
    want_b = adam_step_backward(*([None if x is None else x.double() for x in l] for l in inc), dbl(g), dbl(m1),
                                dbl(v1), *hp, (True, True, True))
    # torch.optim's own arithmetic in the kernels' dtype (the reference backend): where a result
    # cancels (m' = b1 m + (1 - b1) g with the two terms nearly equal), no float32 computation
    # is within 2e-6 of it relative to its own size; the C++ kernels must then be no further
    # from float64 than torch.optim's float32 result is (a lerp from the far end, say, is)
    ref_f = adam_step(p, g, m, v, *hp)
    ref_b = adam_step_backward(*inc, g, m1, v1, *hp, (True, True, True))
    rtol = 2e-6 if dtype == torch.float32 else 1e-13
    for got, want, ref in zip(list(got_f) + list(got_b), list(want_f) + list(want_b), list(ref_f) + list(ref_b)):
        for a, b, r in zip(got, want, ref):
            assert a.dtype == dtype and torch.isfinite(a).all()
            err, ref_err = (a.double() - b).abs(), (r.double() - b).abs()
            assert (err <= 4 * ref_err + rtol * float(b.abs().max()) + 1e-30).all(), (err.max(), ref_err.max())
