import os

import torch

# Without a GPU, Triton kernels are run by Triton's interpreter on CPU tensors.
# This must be set before any Triton kernel is defined (i.e. before import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=False, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=10, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402

import commentaries_ext  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="session")
def _poison_kernel_outputs():
    """Kernel outputs start as NaN during the tests, so unwritten elements show."""
    previous = commentaries_ext.backend.set_poison_outputs(True)
    yield
    commentaries_ext.backend.set_poison_outputs(previous)
