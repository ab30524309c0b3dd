"""Label-dependent blending: coefficients, baselines, the two-target loss, and
the learned matrix's hypergradient against the exact (dense IFT) one."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from commentaries_ext.commentary import (
    Blending,
    BatchError,
    commentary_loss,
    plot_blending,
    val_loss_fn,
    validation_loss,
)
from commentaries_ext.engine import CGConfig, FunctionalModule, NeumannConfig
from commentaries_ext.learn import learn_bptt
from commentaries_ext.wrapper import CommentaryOptimizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_init_and_coefficients():
    c = Blending(4)
    assert c.phi.shape == (4, 4) and bool((c.phi == -1).all())
    x, y = torch.randn(8, 3, 5, 5), torch.randint(0, 4, (8,))
    b = c.prepare(x, y, generator=torch.Generator().manual_seed(0))
    prep = c(b)
    lam = 1 - 0.5 * torch.sigmoid(torch.tensor(-1.0))
    torch.testing.assert_close(prep.lam, lam.expand(8))
    perm = b["perm"]
    torch.testing.assert_close(prep.target_b, y[perm])
    torch.testing.assert_close(prep.x, lam * x + (1 - lam) * x[perm])
    with torch.no_grad():
        c.phi.normal_(0, 3)
    lam = c(b).lam
    assert bool(((lam > 0.5) & (lam < 1)).all())
    torch.testing.assert_close(lam, 1 - 0.5 * torch.sigmoid(c.phi[y, y[perm]]))
    torch.testing.assert_close(c.matrix(), 1 - 0.5 * torch.sigmoid(c.phi.detach()))


def test_two_target_loss():
    c = Blending(3)
    with torch.no_grad():
        c.phi.normal_()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    prep = c(c.prepare(x, y))
    logits = torch.randn(6, 3, dtype=torch.float64)
    ce = lambda t: torch.nn.functional.cross_entropy(logits, t, reduction="none")
    lam = prep.lam.double()
    expect = (lam * ce(y) + (1 - lam) * ce(prep.target_b)).mean()
    torch.testing.assert_close(commentary_loss(logits, prep).double(), expect)


def test_baselines():
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    none = Blending(3, policy="none")
    prep = none(none.prepare(x, y))
    assert prep.x is x and prep.lam is None and list(none.parameters()) == []
    rnd = Blending(3, policy="random")
    lam = rnd(rnd.prepare(x, y)).lam
    assert bool(((lam >= 0.5) & (lam <= 1)).all()) and lam.unique().numel() > 1
    mix = Blending(3, policy="mixup", alpha=0.4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    b1, b2 = mix.prepare(x, y, generator=g1), mix.prepare(x, y, generator=g2)
    torch.testing.assert_close(b1["lam"], b2["lam"])  # reproducible with a generator
    assert b1["lam"].unique().numel() == 1 and 0 < float(b1["lam"][0]) < 1
    lams = torch.stack([mix.prepare(x, y)["lam"][0] for _ in range(300)])
    assert abs(float(lams.mean()) - 0.5) < 0.08  # Beta(a, a) has mean 1/2
    with pytest.raises(ValueError, match="policy"):
        Blending(3, policy="cutmix")
    with pytest.raises(ValueError, match="no learned matrix"):
        mix.matrix()


def test_validation_is_never_blended():
    model = nn.Linear(2, 3)
    fm = FunctionalModule(model)
    xv, yv = torch.randn(5, 2), torch.randint(0, 3, (5,))
    L = val_loss_fn(fm)(fm.params(), {}, {"x": xv, "y": yv})
    torch.testing.assert_close(L, torch.nn.functional.cross_entropy(model(xv), yv))
    torch.testing.assert_close(validation_loss(model(xv), yv), L)


def test_bad_input():
    c = Blending(3)
    with pytest.raises(BatchError, match="label 5 out of range"):
        c.prepare(torch.randn(2, 2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="no blending partners"):
        c({"x": torch.randn(2, 2), "y": torch.tensor([0, 1]), "progress": torch.zeros(2)})


def _problem():
    C, n = 3, 30
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 1.0], [1.0, -0.5], [-1.0, -0.5]], dtype=torch.float64)
    y = torch.arange(n) % C
    x = centers[y] + 0.8 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    yv = torch.arange(n) % C
    xv = centers[yv] + 0.8 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    com = Blending(C).double()
    with torch.no_grad():
        com.phi.copy_(torch.randn(C, C, generator=g, dtype=torch.float64))
    torch.manual_seed(0)
    model = nn.Linear(2, C).double()
    batch = com.prepare(x, y, generator=torch.Generator().manual_seed(3))
    return com, model, batch, (xv, yv)


def _fit(com, model, batch):
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        L = com.training_loss(model, batch)
        L.backward()
        return L

    for _ in range(3):
        opt.step(closure)


def _exact_hypergradient(com, model, batch, val):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = t[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def LT(t, phi):
        prep = functional_call(com, {"phi": phi}, (batch,))
        return commentary_loss(functional_call(model, unflat(t), (prep.x,)), prep)

    phi = com.phi.detach()
    H = torch.autograd.functional.hessian(lambda t: LT(t, phi), theta)
    th = theta.clone().requires_grad_()
    M = torch.autograd.functional.jacobian(lambda p: torch.autograd.grad(LT(th, p), th, create_graph=True)[0], phi)
    th = theta.clone().requires_grad_()
    v = torch.autograd.grad(validation_loss(functional_call(model, unflat(th), (val[0],)), val[1]), th)[0]
    p = torch.linalg.pinv(H) @ v  # softmax logits: H is singular along a null direction v avoids
    return -(p[:, None, None] * M).sum(0)


def _cos(a, b):
    return float((a * b).sum() / a.norm() / b.norm())


def test_blending_hypergradient_matches_exact_and_moves_phi_downhill():
    com, model, batch, val = _problem()
    _fit(com, model, batch)
    exact = _exact_hypergradient(com, model, batch, val)
    # finite-difference check of the exact value on its largest entry
    i, j = divmod(int(exact.abs().argmax()), 3)
    fd = []
    for s in (1, -1):
        c2, m2, b2, v2 = _problem()
        with torch.no_grad():
            c2.phi[i, j] += s * 1e-4
        _fit(c2, m2, b2)
        with torch.no_grad():
            fd.append(float(validation_loss(m2(v2[0]), v2[1])))
    assert abs((fd[0] - fd[1]) / 2e-4 - float(exact[i, j])) < 1e-3 * float(exact.abs().max()) + 1e-7

    w = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, com, val_loader=[val],
                            solver=CGConfig(max_iter=50))
    cg = w.hypergradient(train_batch=batch).grads["phi"]
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-9)
    # the reference setting (Neumann K=1, alpha = student lr) points the same way
    w.solver = NeumannConfig(K=1, alpha=0.1)
    neu = w.hypergradient(train_batch=batch).grads["phi"]
    assert _cos(neu, exact) > 0.8
    before = com.phi.detach().clone()
    w.hyper_step(train_batch=batch)
    step = com.phi.detach() - before
    assert _cos(step, -exact) > 0.5
    assert w.hyper_steps == 1


def test_bptt_learns_the_matrix():
    torch.manual_seed(0)
    x, y = torch.randn(24, 2), torch.arange(24) % 3
    c = Blending(3)
    r = learn_bptt(c, lambda: nn.Linear(2, 3), (x, y), (x, y), inner_steps=4, outer_steps=3, inner_optimizer="sgd",
                   inner_lr=0.5, outer_lr=0.1, batch_size=8)
    assert not bool((c.phi == -1).all()) and len(r.history) == 3


def test_plot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    assert isinstance(plot_blending(Blending(4), ["a", "b", "c", "d"]), Figure)


def test_plot_takes_the_readme_call_and_the_older_one():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_val, y_val = torch.randn(12, 1, 8, 8), torch.randint(0, 4, (12,))
    names = ["a", "b", "c", "d"]
    for fig, want in ((Blending(4).plot(x_val[:256], y_val[:256]), ["0", "1", "2", "3"]),  # x, y: ignored
                      (Blending(4).plot(names), names),  # the older positional class names
                      (Blending(4).plot(x_val, y_val, class_names=names), names)):
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == want
        plt.close(fig)


def test_fused_blend_matches_plain_and_engine_losses_use_plain(monkeypatch):
    from commentaries_ext.commentary import base, blending

    assert blending._masked_blend() is not None, "the fused masked_blend op is on by default"
    x, y = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    c = Blending(3).double()
    with torch.no_grad():
        c.phi.normal_()
    b = c.prepare(x, y)
    fused = c(b).x
    with base.plain_blend():
        assert blending._masked_blend() is None
        plain = c(b).x
    torch.testing.assert_close(fused, plain)
    calls = []
    real = blending._masked_blend

    def spy():
        fn = real()
        if fn is not None:
            calls.append(1)
        return fn

    monkeypatch.setattr(blending, "_masked_blend", spy)
    model = nn.Linear(18, 3).double()
    c.training_loss(lambda t: model(t.flatten(1)), b)
    assert calls  # the student's step uses the fused op
    calls.clear()
    fm = FunctionalModule(nn.Sequential(nn.Flatten(), model))
    from commentaries_ext.commentary import train_loss_fn

    train_loss_fn(c, fm)(fm.params(), c.hparams(), b)
    assert not calls  # the engine's loss does not


def test_blend_takes_a_half_background_in_the_input_dtype():
    """Under autocast a background computed by a convolution (the blurred one of AttentionMask)
    comes back in half precision while the images stay float32: blend casts it, as it casts m
    (masked_blend refused the mixed dtypes). bfloat16 CPU autocast stands in for float16 on a GPU."""
    from commentaries_ext.commentary.blending import blend

    x = torch.randn(4, 3, 5, 5)
    m = torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = torch.nn.functional.conv2d(x, torch.ones(3, 1, 3, 3) / 9, padding=1, groups=3)
        assert xb.dtype == torch.bfloat16
        out = blend(x, m, x_b=xb)
    assert out.dtype == torch.float32
    mv = m.view(4, 1, 1, 1)
    torch.testing.assert_close(out, mv * x + (1 - mv) * xb.float())
