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
