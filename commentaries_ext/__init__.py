"""commentaries_ext: Teaching with Commentaries (ICLR 2021) as a PyTorch extension.

``commentaries_ext.build_info()`` says what was compiled and which backend runs
each kernel op on each device; ``commentaries_ext.backend`` forces one.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import backend, _compiled  # noqa: F401  (loads the compiled ops)
from . import ops  # noqa: F401  (registers the ops and their backends)


def build_info() -> dict:
    """What was built and which backend each kernel op uses on each device here."""
    import torch

    info = {
        "version": __version__,
        "torch": torch.__version__,
        "compiled": _compiled.loaded(),
        "compiled_with": _compiled.build_info(),
        "load_error": _compiled.load_error(),
        "triton": _triton_status(),
        "ops": backend.report(),
    }
    return info


def _triton_status() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "not installed"
    return f"triton {triton.__version__}"
