"""Plain-PyTorch col2im (backend ``reference``): ATen's own; contract in
``commentaries_ext/ops/fold.py``."""
from __future__ import annotations

import torch

from .. import backend


def col2im(cols: torch.Tensor, output_size, kernel_size, dilation, padding, stride) -> torch.Tensor:
    return torch.ops.aten.col2im(cols, list(output_size), list(kernel_size), list(dilation), list(padding),
                                 list(stride))


backend.register("reference", "col2im", col2im)
