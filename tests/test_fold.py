"""col2im (ops/fold.py) on every CPU backend against ATen's col2im in float64, its
gradients, and its errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from commentaries_ext import backend
from commentaries_ext.ops.fold import col2im

BACKENDS = backend.candidates("col2im", "cpu")


def test_the_cpp_backend_is_built():
    assert "cpp" in BACKENDS, "the C++ kernels are part of the build"


@st.composite
def problems(draw):
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    # an input size whose convolution output is not empty
    hw = tuple(draw(st.integers(max(1, dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i]), 19)) for i in range(2))
    out = [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    n, c = draw(st.integers(0, 4)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    cols = torch.randn(n, c * kernel[0] * kernel[1], out[0] * out[1], generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()):
        cols = cols.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    return cols, hw, kernel, dilation, padding, stride, draw(st.sampled_from([torch.float32, torch.float64]))


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=80, deadline=None)
@given(prob=problems())
def test_matches_float64(name, prob):
    cols, hw, kernel, dilation, padding, stride, dtype = prob
    expect = torch.ops.aten.col2im(cols, list(hw), list(kernel), list(dilation), list(padding), list(stride))
    with backend.use(name):
        got = col2im(cols.to(dtype), hw, kernel, dilation, padding, stride)
    assert got.dtype == dtype and got.shape == expect.shape and got.is_contiguous()
    # each output is a sum of at most KH*KW inputs
    mag = torch.ops.aten.col2im(cols.abs(), list(hw), list(kernel), list(dilation), list(padding), list(stride))
    eps = torch.finfo(dtype).eps
    assert bool(((got.double() - expect).abs() <= 2 * kernel[0] * kernel[1] * eps * mag + 1e-300).all())


def test_the_reference_convnet_first_layer_exactly():
    # what the engine runs: [32, 25, 196] -> [32, 1, 28, 28] (5x5, stride 2, padding 2)
    cols = torch.randn(32, 25, 196, dtype=torch.float64)
    got = col2im(cols, (28, 28), (5, 5), 1, 2, 2)
    torch.testing.assert_close(got, torch.ops.aten.col2im(cols, [28, 28], [5, 5], [1, 1], [2, 2], [2, 2]),
                               rtol=1e-15, atol=1e-15)


def test_gradients():
    cols = torch.randn(2, 2 * 6, 12, dtype=torch.float64, requires_grad=True)  # 3x2 kernel on a 5x6 input
    args = ((5, 6), (3, 2), (1, 2), (1, 0), (2, 1))
    torch.autograd.gradcheck(lambda c: col2im(c, *args), (cols,))
    torch.autograd.gradgradcheck(lambda c: col2im(c, *args), (cols,))
    g = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    (got,) = torch.autograd.grad(col2im(cols, *args), cols, g)
    torch.testing.assert_close(got, F.unfold(g, *args[1:]))


def test_opcheck_of_the_cpp_kernel():
    cols = torch.randn(3, 2 * 9, 16)
    torch.library.opcheck(torch.ops.commentaries_ext.cpp_col2im.default, (cols, [8, 8], [3, 3], [1, 1], [1, 1], [2, 2]))


def test_bad_input_is_refused_with_the_argument_named():
    cols = torch.randn(2, 9, 16)
    with pytest.raises(ValueError, match="cols must be a 3-D tensor"):
        col2im(torch.randn(9, 16), (8, 8), 3, 1, 1, 2)
    with pytest.raises(ValueError, match=r"does not match an output of 8x8"):
        col2im(torch.randn(2, 9, 15), (8, 8), 3, 1, 1, 2)
    with pytest.raises(ValueError, match=r"does not match"):
        col2im(torch.randn(2, 10, 16), (8, 8), 3, 1, 1, 2)  # 10 rows: not C * 9
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        col2im(cols, (8, 8), 3, 1, 1, (2, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        col2im(cols, (8, 8), 3, 1, 1, 0)
    with pytest.raises(RuntimeError):  # other dtypes: ATen's own col2im and its error
        col2im(cols.to(torch.int64), (8, 8), 3, 1, 1, 2)


def test_cpp_kernel_refuses_sizes_whose_products_overflow():
    """Called directly, the C++ kernel refuses parameters whose products overflow (a kernel of
    2^32 x 2^32 made KH * KW 0, a division by zero; output sizes of 2^32 each made OH * OW 0,
    a read of an empty cols): an error, not a crash."""
    op = torch.ops.commentaries_ext.cpp_col2im
    with pytest.raises(RuntimeError, match="must be at most"):
        op(torch.randn(1, 1, 4), [1, 1], [2**32, 2**32], [1, 1], [2**31, 2**31], [1, 1])
    with pytest.raises(RuntimeError, match="does not match"):
        op(torch.randn(64, 64, 0), [2, 2], [1, 1], [1, 1], [2**31 - 1, 2**31 - 1], [1, 1])
    # no block fits (H = 2 < kernel 4): C++ division truncated (2 - 3 - 1) / 3 + 1 to 1 block, not 0
    with pytest.raises(RuntimeError, match="does not match an output of 2x1"):
        op(torch.randn(1, 4, 1), [2, 1], [4, 1], [1, 1], [0, 0], [3, 1])
