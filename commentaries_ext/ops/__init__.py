"""The kernel op families (DESIGN.md section 4), each a module here:

* ``cross_entropy`` -- weighted / blended softmax cross-entropy, its gradient,
  loss-Hessian-vector product and per-row JVP;
* ``blend``         -- masked blending ``m * x_a + (1 - m) * x_b``;
* ``solver``        -- fused solver updates over lists of tensors;
* ``channel``       -- per-channel sums and combinations (BatchNorm's forward-mode rules);
* ``fold``          -- col2im (convolution input gradients by matmul + col2im).

Each module defines the device-independent ops with ``torch.library`` (fake and
autograd registrations included) and picks a backend per call through
``commentaries_ext.backend``.
"""
from . import cross_entropy  # noqa: E402,F401
from . import blend  # noqa: E402,F401
from . import solver  # noqa: E402,F401
from . import channel  # noqa: E402,F401
from . import fold  # noqa: E402,F401
try:  # Triton kernels of every family (backend "triton"); optional
    from .. import triton_kernels  # noqa: E402,F401
except Exception:  # pragma: no cover - triton missing or broken
    pass
