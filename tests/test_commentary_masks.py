"""Attention masks: shapes and values, backgrounds, and a mask centroid that
moves onto a planted salient patch."""
import pytest
import torch
from torch import nn

from commentaries_ext.commentary import AttentionMask, BatchError, gaussian_blur, plot_masks
from commentaries_ext.learn import learn_bptt, learn_ift


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mask_shape_values_and_centroid():
    torch.manual_seed(0)
    c = AttentionMask(3, sigma=0.2)
    x, y = torch.randn(4, 3, 9, 7), torch.zeros(4, dtype=torch.long)
    prep = c(c.prepare(x, y))
    m, mu = prep.extras["mask"], prep.extras["centroid"]
    assert m.shape == (4, 1, 9, 7) and mu.shape == (4, 2)
    assert bool(((m > 0) & (m <= 1)).all()) and bool(((mu >= 0) & (mu <= 1)).all())
    a = c.attention(x)
    torch.testing.assert_close(a.sum(dim=(1, 2)), torch.ones(4))
    # the mask is the Gaussian centred on the centroid
    r = (torch.arange(9) + 0.5) / 9
    col = (torch.arange(7) + 0.5) / 7
    d2 = (r.view(9, 1) - mu[0, 0]) ** 2 + (col.view(1, 7) - mu[0, 1]) ** 2
    torch.testing.assert_close(m[0, 0], torch.exp(-d2 / (2 * 0.2 ** 2)))
    torch.testing.assert_close(prep.x, m * x)  # zeros background


def test_mask_with_offset_b_is_clipped():
    c = AttentionMask(1, b=0.3)
    with torch.no_grad():
        m, _ = c.masks(torch.randn(2, 1, 6, 6))
    assert float(m.min()) >= 0.3 - 1e-6 and float(m.max()) <= 1.0


@pytest.mark.parametrize("background", ["zeros", "mean", "blur", "other"])
def test_backgrounds(background):
    torch.manual_seed(0)
    c = AttentionMask(2, background=background)
    x, y = torch.randn(5, 2, 8, 8), torch.zeros(5, dtype=torch.long)
    b = c.prepare(x, y)
    prep = c(b)
    m = prep.extras["mask"]
    if background == "zeros":
        bg = torch.zeros_like(x)
    elif background == "mean":
        bg = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    elif background == "blur":
        bg = gaussian_blur(x, c.blur_sigma)
        assert float(bg.std()) < float(x.std())
    else:
        perm = b["perm"]
        assert bool((perm != torch.arange(5)).all())  # never its own background
        assert sorted(perm.tolist()) == list(range(5))
        bg = x[perm]
    torch.testing.assert_close(prep.x, m * x + (1 - m) * bg)


def test_gradients_reach_the_unet():
    c = AttentionMask(1, background="blur")
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 2, (3,))
    loss = c.training_loss(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), c.prepare(x, y))
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in c.parameters())


def test_bad_input():
    c = AttentionMask(3)
    with pytest.raises(BatchError, match=r"images \[N, 3, H, W\]"):
        c.prepare(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="background"):
        AttentionMask(1, background="noise")


def _patch_data(n, g):
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    x[:, 0, 0:3, 0:3] += (y * 2 - 1).view(-1, 1, 1).float() * 1.5  # the only signal: a top-left patch
    return x, y


def test_centroid_moves_onto_planted_patch():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, val = _patch_data(64, g), _patch_data(64, g)
    c = AttentionMask(1, sigma=0.15, width=8)
    target = torch.tensor([1.5 / 8, 1.5 / 8])

    def dist():
        with torch.no_grad():
            return float((c.masks(val[0])[1] - target).norm(dim=1).mean())

    d0 = dist()
    learn_bptt(c, lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), train, val, inner_steps=8,
               inner_optimizer="sgd", inner_lr=0.5, outer_steps=25, outer_lr=0.01, batch_size=32)
    d1 = dist()
    assert d0 > 0.3 and d1 < 0.5 * d0, (d0, d1)


def test_ift_runs_and_moves_the_mask():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    train, val = _patch_data(32, g), _patch_data(32, g)
    c = AttentionMask(1, width=4)
    before = [p.detach().clone() for p in c.parameters()]
    r = learn_ift(c, nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), train, val, steps=3, batch_size=8)
    assert any(not torch.equal(a, b) for a, b in zip(before, c.parameters()))
    assert all("val_loss" in h for h in r.history)


def test_plot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    assert isinstance(plot_masks(AttentionMask(1), torch.randn(4, 1, 8, 8)), Figure)
    assert isinstance(AttentionMask(3).plot(torch.randn(2, 3, 8, 8)), Figure)


def test_plot_takes_the_readme_call():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_val, y_val = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    fig = AttentionMask(1).plot(x_val[:256], y_val[:256])  # y is not needed: ignored
    assert len(fig.axes) == 3 * 8  # image, mask, student input for the first max_images=8
    plt.close(fig)
    with pytest.raises(TypeError, match=r"needs images: plot\(x\)"):
        AttentionMask(1).plot()


def test_attention_in_float64_is_computed_in_float64():
    """The spatial softmax ran in float32 for float64 inputs too (8e-8 off a float64 reference)."""
    torch.manual_seed(0)
    m = AttentionMask(1).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    z = m.net(x)[:, 0] / m.temperature
    want = torch.softmax(z.reshape(2, -1), dim=1).reshape(2, 8, 8)
    got = m.attention(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
