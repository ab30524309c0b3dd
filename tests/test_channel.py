"""Per-channel sums and combinations (ops/channel.py) on every CPU backend against a
float64 reference, and their errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commentaries_ext import backend
from commentaries_ext.ops.channel import batch_norm_reverse, channel_combine, channel_sums

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


def _sums_on_one_and_two_threads(name, a, b):
    before = torch.get_num_threads()
    try:
        with backend.use(name):
            torch.set_num_threads(1)
            one = channel_sums(a, b)
            torch.set_num_threads(2)
            two = channel_sums(a, b)
    finally:
        torch.set_num_threads(before)
    return one, two


@pytest.mark.parametrize("name", BACKENDS)
def test_sums_do_not_depend_on_the_number_of_threads(name):
    x = torch.randn(64, 8, 33, 7)
    one, two = _sums_on_one_and_two_threads(name, [x, x], [None, x])
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


@st.composite
def bn_problems(draw):
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 19), min_size=0, max_size=2))
    shape = (n, c, *spatial)
    if n * int(torch.tensor(spatial).prod()) < 2 if spatial else n < 2:
        shape = (n + 1, c, *spatial)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 5.0]))

    def big():
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if draw(st.booleans()) and t.dim() >= 3:
            t = t.transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous
        return t

    x = big() * scale + offset * scale
    u, gy = big(), big()
    small = [torch.randn(c, generator=g, dtype=torch.float64) for _ in range(3)]  # weight, ugw, ugb
    needs = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    ugw, ugb = (t if draw(st.booleans()) else None for t in small[1:])
    return x, u if draw(st.integers(0, 4)) else None, gy, small[0], ugw, ugb, needs, draw(
        st.sampled_from([torch.float32, torch.float64]))


def _composite_double_backward(u, gy, x, w, ugw, ugb):
    """The gradients w.r.t. ``(gy, x, w)`` of ``<u, gx> + <ugw, gw> + <ugb, gb>`` by autograd through a
    composite batch norm's backward (None cotangents: zero), and ``gw``, ``gb``, x̂."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    xr, gyr, wr = (t.detach().clone().requires_grad_(True) for t in (x, gy, w))
    rstd = (xr.var(dims, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    xhat = (xr - xr.mean(dims, keepdim=True)) * rstd
    gb, gw = gyr.sum(dims), (gyr * xhat).sum(dims)
    gx = wr.view(shape) * rstd * (gyr - gb.view(shape) / m - xhat * gw.view(shape) / m)
    pairs = [(o, c) for o, c in zip((gx, gw, gb), (u, ugw, ugb)) if c is not None]
    want = torch.autograd.grad([o for o, _ in pairs], (gyr, xr, wr), [c for _, c in pairs], allow_unused=True) \
        if pairs else (None, None, None)
    return list(want), gw.detach(), gb.detach(), xhat.detach()


@pytest.mark.parametrize("name", backend.candidates("batch_norm_reverse", "cpu"))
@settings(max_examples=60, deadline=None)
@given(prob=bn_problems())
def test_batch_norm_reverse_matches_float64_autograd(name, prob):
    # against the double backward of the composite batch norm in float64
    x, u, gy, w, ugw, ugb, needs, dtype = prob
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    rstd = (x.var(dims, unbiased=False) + 1e-5).rsqrt()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    want, gw, gb, xhat = _composite_double_backward(u, gy, x, w, ugw, ugb)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    args = (cast(u), cast(gy), cast(x), cast(mean), cast(rstd), cast(w), cast(gw.detach()), cast(gb.detach()),
            cast(ugw), cast(ugb), needs)
    with backend.use(name):
        got = batch_norm_reverse(*args)
    with backend.use("reference"):  # the rule's formulas as torch ops in the same dtype
        ref = batch_norm_reverse(*args)
    eps = torch.finfo(dtype).eps
    m = x.numel() // x.shape[1]
    # the size of the terms each result is a sum of (the reverse rule's formulas with every
    # factor made positive), per output: gy, x, weight
    with torch.no_grad():
        ua = (u if u is not None else torch.zeros_like(gy)).abs()
        xh = xhat.detach().abs()
        a_, b_ = (gb.detach() / m).abs().view(shape), (gw.detach() / m).abs().view(shape)
        wr_ = (w.abs() * rstd).view(shape)
        ugw_a = (ugw.abs() if ugw is not None else torch.zeros_like(w)).view(shape)
        ugb_a = (ugb.abs() if ugb is not None else torch.zeros_like(w)).view(shape)
        sup_a = (ua * (gy.abs() + a_ + xh * b_)).sum(dims, keepdim=True)
        sux_a = (ua * xh).sum(dims, keepdim=True)
        terms = [float((wr_ * ua + ugw_a * xh + ugb_a + wr_ * (ua.sum(dims, keepdim=True) + sux_a) / m).max()),
                 float((rstd.view(shape) * (wr_ * b_ * ua + (ugw_a + wr_ * sux_a / m) * gy.abs())
                        + wr_ * rstd.view(shape) * sup_a / m * xh).max()) * 4,
                 float((rstd.view(shape) * sup_a).max())]
        # x rounded to the dtype moves x̂ by ~eps |x| rstd: a spread small against |x| is ill-conditioned
        cond = 1 + float((x.abs() * rstd.view(shape)).max())
        terms = [t * cond for t in terms]
    for i, (a, r, e) in enumerate(zip(got, ref, want)):
        if not needs[i]:
            assert a is None
            continue
        e = torch.zeros(a.shape, dtype=torch.float64) if e is None else e
        assert a.dtype == dtype and a.shape == e.shape
        # where the terms cancel (N = 2 normalises to +-1, say), no computation in this dtype is
        # within a few eps of the result: a sum of m terms is within m eps of their size, and no
        # less accurate than the torch-op composition in the same dtype
        err, ref_err = float((a.double() - e).abs().max()), float((r.double() - e).abs().max())
        bound = 8 * m * eps * terms[i] + 1e-300
        if name != "reference" and dtype == torch.float32:
            bound += 4 * ref_err
        assert err <= bound, (i, err, ref_err, terms[i])


def test_batch_norm_reverse_bad_input():
    x = torch.randn(4, 3, 5)
    c = torch.randn(3)
    with pytest.raises(ValueError, match=r"\(u, gy, x\)\[1\] has shape"):
        batch_norm_reverse(x, torch.randn(4, 3, 6), x, c, c, c, c, c)
    with pytest.raises(ValueError, match=r"rstd must have shape \(3,\)"):
        batch_norm_reverse(x, x, x, c, torch.randn(4), c, c, c)
    with pytest.raises(ValueError, match="ugw is torch.float64"):
        batch_norm_reverse(x, x, x, c, c, c, c, c, c.double())
    with pytest.raises(ValueError, match="needs must have 3 entries"):
        batch_norm_reverse(x, x, x, c, c, c, c, c, needs=(True, True))


@pytest.mark.parametrize("name", backend.candidates("batch_norm_reverse", "cpu"))
@pytest.mark.parametrize("shape", [(7000, 3), (3, 2, 9000), (300, 4000)], ids=["many-rows-S1", "long-rows", "wide-S1"])
def test_batch_norm_reverse_over_many_chunks(name, shape):
    # more rows than one 16384-element chunk of the sums (BatchNorm1d: S = 1), and rows longer than a chunk
    g = torch.Generator().manual_seed(9)
    x, u, gy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    c = shape[1]
    w, ugw, ugb = (torch.randn(c, generator=g, dtype=torch.float64) for _ in range(3))
    dims = [0] + list(range(2, x.dim()))
    mean, rstd = x.mean(dims), (x.var(dims, unbiased=False) + 1e-5).rsqrt()
    want, gw, gb, _ = _composite_double_backward(u, gy, x, w, ugw, ugb)
    with backend.use(name):
        got = batch_norm_reverse(u, gy, x, mean, rstd, w, gw, gb, ugw, ugb)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * float(e.abs().max()))


@pytest.mark.parametrize("name", BACKENDS)
def test_wide_inputs_with_short_rows(name):
    """[N, C] with many channels (BatchNorm1d, S = 1): 80 chunks of 16K rows, more than the C++
    sums' scratch budget allows for 2 x 32768 channels (64), so they take longer chunks (the
    per-chunk partials of every channel took N C^2 / 16K doubles); the sums stay exact and
    thread-independent."""
    g = torch.Generator().manual_seed(10)
    x, b = (torch.randn(40, 32768, generator=g, dtype=torch.float64) for _ in range(2))
    one, two = _sums_on_one_and_two_threads(name, [x, x], [None, b])
    assert torch.equal(one, two)
    torch.testing.assert_close(one, torch.stack([x.sum(0), (x * b).sum(0)]), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ kernels are not built")
def test_cpp_sums_scratch_is_bounded():
    """The C++ sums' per-chunk partials of a [256, 32768] float32 input (32 MB) took 128 MB; now at
    most 8 MB or 64 outputs' worth (16 MB here). Peak memory measured in a fresh process."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from commentaries_ext import backend\n"
        "from commentaries_ext.ops.channel import channel_sums\n"
        "x = torch.randn(256, 32768)\n"
        "with backend.use('cpp'):\n"
        "    channel_sums([x[:2, :64]])\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    out = channel_sums([x])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) < 48, f"peak memory grew by {res.stdout.split()[-1]} MB"


@pytest.mark.parametrize("name", backend.candidates("batch_norm_reverse", "cpu"))
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (4, 0, 2)])
def test_batch_norm_reverse_of_empty_inputs_is_zero(name, shape):
    x = torch.empty(shape)
    c = torch.randn(shape[1])
    with backend.use(name):
        ggy, gx, gw = batch_norm_reverse(x, x, x, c, c, c, c, c)
    assert ggy.shape == gx.shape == x.shape and gw.shape == (shape[1],)
    assert bool((gw == 0).all())


def test_a_forced_backend_without_the_op_falls_back_to_the_reference():
    """Forcing a backend to test its kernels (cuda: it has no channel ops, nor any CPU kernel)
    must not break the engine's helper ops that backend lacks: they run the reference, where a
    plain kernel lookup raises."""
    assert "channel_sums" not in backend._kernels.get("cuda", {})
    assert backend.helper_kernel("channel_sums", "cpu") is backend.kernel("channel_sums", "cpu")
    with backend.use("cuda"):
        with pytest.raises(RuntimeError, match="was forced but has no 'channel_sums'"):
            backend.kernel("channel_sums", "cpu")
        for op in ("channel_sums", "channel_combine", "batch_norm_reverse", "col2im", "adam_step"):
            assert backend.helper_kernel(op, "cpu") is backend._kernels["reference"][op]
        a = [torch.randn(2, 3, 4)]
        torch.testing.assert_close(channel_sums(a), a[0].sum(dim=(0, 2))[None])
