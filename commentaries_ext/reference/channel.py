"""Plain-PyTorch per-channel kernels (backend ``reference``); contract in
``commentaries_ext/ops/channel.py``."""
from __future__ import annotations

import torch

from .. import backend


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def channel_sums(a: list[torch.Tensor], b: list[torch.Tensor | None]) -> torch.Tensor:
    acc = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    rows = [(ak.to(acc) * bk.to(acc) if bk is not None else ak.to(acc)).sum(_dims(ak)) for ak, bk in zip(a, b)]
    return torch.stack(rows).to(a[0].dtype)


def channel_combine(xs: list[torch.Tensor], coef: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (xs[0].dim() - 2)
    out = sum(coef[k].view(shape) * x for k, x in enumerate(xs))
    return out + bias.view(shape) if bias is not None else out


backend.register("reference", "channel_sums", channel_sums)
backend.register("reference", "channel_combine", channel_combine)
