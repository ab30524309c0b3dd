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


def batch_norm_reverse_rule(u, ugw, ugb, gy, weight, xhat, rstd, gw, gb, needs, sums, combine):
    """The double backward of batch normalisation's backward ``(gx, gw, gb)(gy, x, weight)``
    with batch statistics: the gradients w.r.t. ``(gy, x, weight)`` (None where ``needs`` is
    False) for the cotangents ``u`` (of gx), ``ugw``, ``ugb`` (None: zero), from ``x̂`` and
    ``rstd`` ([C]).  ``sums`` and ``combine`` are :func:`channel_sums` and
    :func:`channel_combine` of some backend (this module's are differentiable).

    With A = Σgy/M, B = Σ(gy x̂)/M, wr = w rstd and P = gy - A - x̂ B (so gx = wr P):
      d/dgy = wr (u - Σu/M - x̂ Σ(u x̂)/M) + ugw x̂ + ugb
      d/dw  = rstd Σ(u P)
      d/dx  = rstd (q - Σq/M - x̂ Σ(q x̂)/M) - wr rstd Σ(u P)/M x̂,  q = -wr B u + (ugw - wr Σ(u x̂)/M) gy
    (from pairing BatchNorm's forward-mode rule, ``engine/batchnorm.py``, with the cotangents):
    one pass for the sums, one combination per input gradient."""
    m = xhat.numel() // xhat.shape[1]
    u = torch.zeros_like(gy) if u is None else u
    ugw = torch.zeros_like(gw) if ugw is None else ugw
    ugb = torch.zeros_like(gb) if ugb is None else ugb
    s = sums([u, u, u], [None, xhat, gy])
    su, sux, sug = s[0], s[1], s[2]
    wr = weight * rstd
    A, B = gb / m, gw / m
    sup = sug - A * su - B * sux  # Σ(u P)
    ggy = gx_in = gw_in = None
    if needs[0]:
        ggy = combine([u, xhat], torch.stack([wr, ugw - wr * sux / m]), ugb - wr * su / m)
    if needs[1]:
        cu, cg = -wr * B, ugw - wr * sux / m  # q = cu u + cg gy
        sq, sqx = cu * su + cg * gb, cu * sux + cg * gw
        gx_in = combine([u, gy, xhat], torch.stack([rstd * cu, rstd * cg, -rstd * (sqx + wr * sup) / m]),
                        -rstd * sq / m)
    if needs[2]:
        gw_in = rstd * sup
    return ggy, gx_in, gw_in


def batch_norm_reverse(u, gy, x, mean, rstd, weight, gw, gb, ugw, ugb, needs):
    if x.numel() == 0:  # no elements: gw and gb are zero sums, so is every gradient
        return tuple(torch.zeros_like(t) if n else x.new_empty(0) for t, n in zip((gy, x, weight), needs))
    xhat = channel_combine([x], rstd.view(1, -1), -mean * rstd)
    out = batch_norm_reverse_rule(u, ugw, ugb, gy, weight, xhat, rstd, gw, gb, needs, channel_sums, channel_combine)
    return tuple(o if o is not None else x.new_empty(0) for o in out)


backend.register("reference", "channel_sums", channel_sums)
backend.register("reference", "channel_combine", channel_combine)
backend.register("reference", "batch_norm_reverse", batch_norm_reverse)
