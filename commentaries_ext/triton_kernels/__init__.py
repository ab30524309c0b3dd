"""Triton kernels of every op family (backend ``triton``).

Each module (``cross_entropy``, ``blend``, ``solver``) defines its kernels and
launchers and registers them with ``commentaries_ext.backend.register("triton",
...)``.  Nothing is registered when ``import triton`` fails.  On a machine
without a GPU the kernels run on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before import; the tests do this).
"""
from __future__ import annotations

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # pragma: no cover - triton is optional
    AVAILABLE = False

if AVAILABLE:
    from . import cross_entropy  # noqa: F401
    from . import blend  # noqa: F401
    from . import solver  # noqa: F401
