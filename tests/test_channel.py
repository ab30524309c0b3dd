"""Per-channel sums and combinations (ops/channel.py) on every CPU backend against a
float64 reference, and their errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commentaries_ext import backend
from commentaries_ext.ops.channel import channel_combine, channel_sums

BACKENDS = backend.candidates("channel_sums", "cpu")


def test_the_cpp_backend_is_built():
    assert "cpp" in BACKENDS, "the C++ kernels are part of the build"


@st.composite
def problems(draw):
    n = draw(st.integers(0, 5))
    c = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(0, 19), min_size=0, max_size=2))
    k = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    shape = (n, c, *spatial)

    def make():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if draw(st.booleans()) and x.dim() >= 3:
            x = x.transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous
        return x

    xs = [make() for _ in range(k)]
    bs = [make() if draw(st.booleans()) else None for _ in range(k)]
    coef = torch.randn(k, c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    return xs, bs, coef, bias, dtype


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(prob=problems())
def test_matches_float64(name, prob):
    xs, bs, coef, bias, dtype = prob
    dims = [0] + list(range(2, xs[0].dim()))
    expect_sums = torch.stack([(x * b if b is not None else x).sum(dims) for x, b in zip(xs, bs)])
    shape = (1, -1) + (1,) * (xs[0].dim() - 2)
    expect_comb = sum(coef[k].view(shape) * x for k, x in enumerate(xs))
    if bias is not None:
        expect_comb = expect_comb + bias.view(shape)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    with backend.use(name):
        got_sums = channel_sums([cast(x) for x in xs], [cast(b) for b in bs])
        got_comb = channel_combine([cast(x) for x in xs], coef.to(dtype), cast(bias))
    assert got_sums.dtype == dtype and got_sums.shape == expect_sums.shape
    assert got_comb.dtype == dtype and got_comb.shape == xs[0].shape and got_comb.is_contiguous()
    eps = torch.finfo(dtype).eps
    # error bound of a sum of m terms: m eps times the sum of magnitudes (plus the input rounding)
    m = max(1, xs[0].numel() // max(1, xs[0].shape[1]))
    mag = torch.stack([(x * b if b is not None else x).abs().sum(dims) for x, b in zip(xs, bs)])
    torch.testing.assert_close(got_sums.double(), expect_sums, rtol=0, atol=float((4 * m * eps * mag).max()) + 1e-300)
    magc = sum(coef[k].abs().view(shape) * x.abs() for k, x in enumerate(xs)) + (bias.abs().view(shape) if bias is not None else 0)
    assert bool(((got_comb.double() - expect_comb).abs() <= 4 * len(xs) * eps * magc + 1e-300).all())


@pytest.mark.parametrize("name", BACKENDS)
def test_sums_do_not_depend_on_the_number_of_threads(name):
    x = torch.randn(64, 8, 33, 7)
    before = torch.get_num_threads()
    try:
        with backend.use(name):
            torch.set_num_threads(1)
            one = channel_sums([x, x], [None, x])
            torch.set_num_threads(2)
            two = channel_sums([x, x], [None, x])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_input_is_refused_with_the_argument_named():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"a\[1\] has shape"):
        channel_sums([x, torch.randn(4, 3, 6)])
    with pytest.raises(ValueError, match=r"b\[0\]"):
        channel_sums([x], [x.double()])
    with pytest.raises(ValueError, match="1 to 8 tensors"):
        channel_sums([])
    with pytest.raises(ValueError, match=r"\[N, C, \*\]"):
        channel_sums([torch.randn(5)])
    with pytest.raises(TypeError, match="dtype"):
        channel_sums([torch.ones(4, 3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"coef must have shape \(2, 3\)"):
        channel_combine([x, x], torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        channel_combine([x], torch.randn(1, 3), torch.randn(4))
    with pytest.raises(ValueError, match="coef is torch.float64"):
        channel_combine([x], torch.randn(1, 3, dtype=torch.float64))
