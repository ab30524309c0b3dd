"""Example-weighting commentaries: shapes, reductions, bad input, and learning
to drive the weight of deliberately mislabelled examples down."""
import pytest
import torch
from torch import nn

from commentaries_ext.commentary import (
    BatchError,
    ExampleWeighting,
    TabularWeighting,
    TeacherNet,
    commentary_loss,
    per_example_ce,
    plot_weights,
    train_loss_fn,
)
from commentaries_ext.learn import learn_bptt, learn_ift


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny problems: intra-op threads only add contention on a shared 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_teacher_net_shapes_and_weights_in_unit_interval():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 16, 16)]:
        c = ExampleWeighting.reference(shape, 10, use_label=True)
        x, y = torch.randn(5, *shape), torch.randint(0, 10, (5,))
        prep = c(c.prepare(x, y, progress=0.5))
        assert prep.weight.shape == (5,)
        assert bool(((prep.weight > 0) & (prep.weight < 1)).all())
        assert prep.x is x and prep.reduction == "mean"  # the default


def test_default_reduction_is_mean_and_old_files_keep_sum():
    # "mean": PyTorch's convention and the CLI's default (a weighted loss on the scale of F.cross_entropy)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    for c in (ExampleWeighting.reference((1, 2, 2), 3), ExampleWeighting(net, call="x"), TabularWeighting(4)):
        assert c.reduction == "mean" and c.config()["reduction"] == "mean"
    # a file's config without the key was written when the default was "sum"
    ref = {"net": "teacher", "in_shape": [1, 2, 2], "num_classes": 3}
    assert ExampleWeighting.from_config(ref).reduction == "sum"
    assert ExampleWeighting.from_config({"net": "user"}, net=net).reduction == "sum"
    assert TabularWeighting.from_config({"num_examples": 4}).reduction == "sum"
    assert ExampleWeighting.from_config(dict(ref, reduction="mean")).reduction == "mean"


def test_teacher_architecture_matches_reference():
    net = TeacherNet((1, 28, 28))
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (2, 32, (5, 5), (2, 2)), (32, 64, (3, 3), (2, 2))]  # image + the i/T channel
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten"]
    assert net.head.out_features == 1


def test_progress_channel_changes_the_weights():
    torch.manual_seed(0)
    c = ExampleWeighting.reference((1, 8, 8)).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    assert not torch.allclose(c.weights(x, y, progress=0.0), c.weights(x, y, progress=1.0))


def test_user_network():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    c = ExampleWeighting(net, call="x", reduction="mean")
    x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 3, (6,))
    w = c(c.prepare(x, y)).weight
    assert torch.allclose(w, torch.sigmoid(net(x)[:, 0]))
    bad = ExampleWeighting(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), call="x")
    with pytest.raises(BatchError, match=r"\[N\] or \[N, 1\]"):
        bad(bad.prepare(x, y))


@pytest.mark.parametrize("reduction", ["sum", "mean", "normalized"])
def test_reductions(reduction):
    torch.manual_seed(0)
    c = TabularWeighting(10, reduction=reduction, init=0.3)
    with torch.no_grad():
        c.logits.normal_()
    x, y, idx = torch.randn(4, 5), torch.randint(0, 5, (4,)), torch.tensor([1, 7, 3, 3])
    logits = torch.randn(4, 5, dtype=torch.float64)
    prep = c(c.prepare(x, y, index=idx))
    w = torch.sigmoid(c.logits[idx, 0]).double()
    l = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expect = {"sum": (w * l).sum(), "mean": (w * l).mean(), "normalized": (w * l).sum() / w.sum()}[reduction]
    torch.testing.assert_close(commentary_loss(logits, prep).double(), expect, rtol=1e-6, atol=1e-6)


def test_tabular_bins():
    c = TabularWeighting(3, num_bins=4)
    with torch.no_grad():
        c.logits.copy_(torch.arange(12.0).view(3, 4))
    x, y = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    w = c(c.prepare(x, y, index=torch.tensor([0, 1, 2]), progress=torch.tensor([0.0, 0.6, 1.0]))).weight
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([0.0, 6.0, 11.0])))


def test_bad_input_is_named():
    c = TabularWeighting(5, num_classes=3)
    x = torch.randn(4, 2)
    with pytest.raises(BatchError, match="needs the example indices"):
        c.prepare(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(BatchError, match="label 3 out of range"):
        c.prepare(x, torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
    with pytest.raises(BatchError, match="index out of range"):
        c.prepare(x, torch.zeros(4, dtype=torch.long), index=torch.tensor([0, 1, 2, 5]))
    with pytest.raises(BatchError, match="empty batch"):
        c.prepare(torch.randn(0, 2), torch.zeros(0, dtype=torch.long), index=torch.zeros(0, dtype=torch.long))
    with pytest.raises(BatchError, match=r"y must have shape \[4\]"):
        c.prepare(x, torch.zeros(3, dtype=torch.long), index=torch.arange(3))
    with pytest.raises(BatchError, match="class indices"):
        c.prepare(x, torch.zeros(4), index=torch.arange(4))
    t = ExampleWeighting.reference((1, 8, 8))
    with pytest.raises(BatchError, match=r"expects images of shape \(1, 8, 8\)"):
        t(t.prepare(torch.randn(2, 1, 7, 7), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="reduction"):
        TabularWeighting(3, reduction="avg")


def test_engine_loss_is_weighted_loss():
    from commentaries_ext.engine import FunctionalModule, WeightedLoss

    model = nn.Linear(4, 3)
    c = TabularWeighting(6, reduction="mean")
    fm = FunctionalModule(model)
    L = train_loss_fn(c, fm)
    assert isinstance(L, WeightedLoss)
    batch = c.prepare(torch.randn(6, 4), torch.randint(0, 3, (6,)), index=torch.arange(6))
    torch.testing.assert_close(L(fm.params(), c.hparams(), batch), c.training_loss(model, batch))


def _mislabelled(seed=0, n=40, every=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.7 * torch.randn(n, 2, generator=g) + (y[:, None] * 2 - 1) * 1.5
    bad = torch.arange(0, n, every)
    y_noisy = y.clone()
    y_noisy[bad] = 1 - y_noisy[bad]
    yv = torch.arange(n) % 2
    xv = 0.7 * torch.randn(n, 2, generator=g) + (yv[:, None] * 2 - 1) * 1.5
    mask = torch.zeros(n, dtype=torch.bool)
    mask[bad] = True
    return (x, y_noisy), (xv, yv), mask


def test_bptt_drives_mislabelled_weights_down():
    train, val, bad = _mislabelled()
    c = TabularWeighting(len(bad), reduction="mean")
    r = learn_bptt(c, lambda: nn.Linear(2, 2), train, val, inner_steps=15, inner_optimizer="sgd", inner_lr=0.5,
                   outer_steps=15, outer_lr=0.2, batch_size=40)
    w = c.weights()
    assert float(w[bad].mean()) < 0.3 < 0.7 < float(w[~bad].mean())
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]


def test_ift_drives_mislabelled_weights_down():
    torch.manual_seed(0)
    train, val, bad = _mislabelled(seed=1)
    c = TabularWeighting(len(bad), reduction="mean")
    r = learn_ift(c, nn.Linear(2, 2), train, val, steps=120, batch_size=40, student_lr=0.05, hyper_lr=0.1)
    w = c.weights()
    assert float(w[bad].mean()) < 0.2 and float(w[~bad].mean()) > 0.6
    assert r.skipped_steps == 0


def test_teacher_network_learns_with_ift_and_bptt():
    # the network form runs through both algorithms and its parameters move
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    student = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    for algo in ("bptt", "ift"):
        c = ExampleWeighting.reference((1, 8, 8), 3, use_label=True, reduction="sum")
        before = [p.detach().clone() for p in c.parameters()]
        if algo == "bptt":
            learn_bptt(c, student, (x, y), (x, y), inner_steps=3, outer_steps=2, inner_optimizer="sgd",
                       inner_lr=0.1, outer_lr=0.01)
        else:
            learn_ift(c, student(), (x, y), (x, y), steps=3)
        assert any(not torch.equal(a, b) for a, b in zip(before, c.parameters()))


def test_plots():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    c = ExampleWeighting.reference((1, 8, 8), 3)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    assert isinstance(plot_weights(c, x, y), Figure)
    t = TabularWeighting(12, num_bins=3)
    assert isinstance(t.plot(y), Figure)
    assert isinstance(t.plot(), Figure)


def test_weights_are_what_a_student_receives():
    """weights() (and the plot) in the module's mode, batch by batch: the reference teacher in
    training mode normalises with each batch's BatchNorm statistics, as learning and reuse apply
    it; the eval-mode weights the plot used to show differ. Running statistics stay as they were."""
    import matplotlib

    matplotlib.use("Agg")
    torch.manual_seed(0)
    c = ExampleWeighting.reference((1, 8, 8), 3)
    with torch.no_grad():  # running statistics unlike any batch's
        for m in c.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.7)
                m.running_var.fill_(3.0)
    x, y = torch.randn(24, 1, 8, 8), torch.randint(0, 3, (24,))
    before = {k: v.clone() for k, v in c.state_dict().items()}
    got = c.weights(x, y, progress=0.5, batch_size=8)
    with torch.no_grad():
        want = torch.cat([c(c.prepare(x[i:i + 8], y[i:i + 8], progress=0.5)).weight for i in range(0, 24, 8)])
    torch.testing.assert_close(got, want)
    for k, v in before.items():
        c.state_dict()[k].copy_(v)  # (the reference computation above did update them)
    assert c.training
    got_whole = c.weights(x, y, progress=0.5)
    assert not torch.allclose(got_whole, got)  # other batches, other statistics
    plot_weights(c, x, y, batch_size=8)
    for k, v in c.state_dict().items():
        assert torch.equal(v, before[k]), k
    c.eval()
    assert not torch.allclose(c.weights(x, y, progress=0.5), got_whole, atol=1e-3)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        c.weights(x, y, batch_size=0)
    # a last batch of one example (BatchNorm cannot normalise it) joins the one before
    c.train()
    x25, y25 = torch.randn(25, 1, 8, 8), torch.randint(0, 3, (25,))
    w25 = c.weights(x25, y25, batch_size=8)
    torch.testing.assert_close(w25[16:], c.weights(x25[16:], y25[16:]))
    with pytest.raises(BatchError, match="empty batch"):
        c.weights(x25[:0], y25[:0])


def test_plot_takes_the_readme_call():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_val, y_val = torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,))
    fig = ExampleWeighting.reference((1, 8, 8), 3).plot(x_val[:256], y_val[:256])
    assert len(fig.axes) == 2
    with pytest.raises(TypeError, match=r"needs a batch: plot\(x, y\)"):
        ExampleWeighting.reference((1, 8, 8), 3).plot(x_val)
    t = TabularWeighting(12, num_bins=3)
    train_labels = torch.arange(12) % 3
    readme = t.plot(x_val[:256], y_val[:256])  # a batch says nothing about the table's examples: ignored
    assert len(readme.axes) == 2  # sorted weights and their histogram
    for fig in (t.plot(train_labels), t.plot(labels=train_labels), t.plot(x_val, y_val, labels=train_labels)):
        assert len(fig.axes) == 3  # the per-class panel has a colour bar
        plt.close(fig)
    with pytest.raises(ValueError, match=r"labels must hold the class of every training example \(shape \[12\]\)"):
        t.plot(labels=y_val)
    plt.close("all")


def test_per_example_ce_matches_torch():
    logits = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    torch.testing.assert_close(per_example_ce(logits, y), torch.nn.functional.cross_entropy(logits, y, reduction="none"))


class _PairNet(nn.Module):
    """A user weighting network over (x, one-hot y): it can spot label noise."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, progress, y):
        return self.f(torch.cat([x, (y[:, None] == torch.arange(2)).to(x.dtype)], 1))


@pytest.mark.parametrize("algorithm", ["bptt", "ift"])
def test_weighting_network_ranks_mislabelled_examples_low(algorithm):
    train, val, bad = _mislabelled(seed=2)
    torch.manual_seed(0)
    c = ExampleWeighting(_PairNet(), num_classes=2, reduction="mean")
    if algorithm == "bptt":
        learn_bptt(c, lambda: nn.Linear(2, 2), train, val, inner_steps=15, inner_optimizer="sgd", inner_lr=0.5,
                   outer_steps=30, outer_lr=0.03, batch_size=40)
    else:
        learn_ift(c, nn.Linear(2, 2), train, val, steps=150, batch_size=40, student_lr=0.05, hyper_lr=0.03)
    w = c.weights(*train)
    assert float(w[bad].mean()) < 0.6 * float(w[~bad].mean())
    ranked_below = float((w[bad][:, None] < w[~bad][None, :]).float().mean())
    # IFT ranks every flipped example below every clean one; BPTT (same initial student
    # every outer step, 15 inner steps) settles on down-weighting the flips of one class only
    assert ranked_below > (0.9 if algorithm == "ift" else 0.45)


class _FakeCE:
    """Stands in for commentaries_ext.ops.cross_entropy (same public signatures)."""

    def __init__(self, broken=False):
        self.calls, self.broken = 0, broken

    def weighted_cross_entropy(self, logits, target, weight, reduction="mean"):
        from commentaries_ext.commentary.base import _plain_ce

        self.calls += 1
        l = _plain_ce(logits, target) * (2.0 if self.broken else 1.0)
        l = l if weight is None else weight * l
        return {"sum": l.sum(), "mean": l.mean(), "none": l}[reduction]

    def blended_cross_entropy(self, logits, target_a, target_b, lam, reduction="mean"):
        from commentaries_ext.commentary.base import _plain_ce

        self.calls += 1
        l = _plain_ce(logits, target_a, target_b, lam)
        return {"sum": l.sum(), "mean": l.mean(), "none": l}[reduction]


@pytest.mark.parametrize("reduction", ["sum", "mean", "normalized"])
def test_fused_cross_entropy_path(monkeypatch, reduction):
    from commentaries_ext.commentary import Blending, base, plain_ops

    fake = _FakeCE()
    base._self_check(fake)
    fake.calls = 0
    monkeypatch.setitem(base._CE_STATE, "mod", fake)
    c = TabularWeighting(8, reduction=reduction)
    with torch.no_grad():
        c.logits.normal_()
    b = c.prepare(torch.randn(8, 3), torch.randint(0, 4, (8,)), index=torch.arange(8))
    logits = torch.randn(8, 4, dtype=torch.float64)
    fused = commentary_loss(logits, c(b))
    assert fake.calls == 1
    with plain_ops():
        plain = commentary_loss(logits, c(b))
    assert fake.calls == 1
    torch.testing.assert_close(fused, plain)
    bl = Blending(4)
    pb = bl(bl.prepare(torch.randn(8, 3), b["y"]))
    fused = commentary_loss(logits, pb)
    assert fake.calls == 2
    with plain_ops():
        torch.testing.assert_close(fused, commentary_loss(logits, pb))


def test_fused_cross_entropy_failing_self_check_is_disabled(monkeypatch):
    from commentaries_ext.commentary import base

    with pytest.raises(AssertionError):
        base._self_check(_FakeCE(broken=True))
