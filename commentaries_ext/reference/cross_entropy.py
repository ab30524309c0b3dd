"""Plain-PyTorch reference of the weighted / blended cross-entropy kernel ops.

Signatures and semantics: DEVELOPING.md ("cross_entropy"). Registered as
backend ``reference``; every device. Math in the logits dtype (float32 for
half inputs); outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mix(target: Tensor, target_b: Tensor | None, lam: Tensor | None, ignore_index: int, dtype):
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    if (target_b is None) != (lam is None):  # as the compiled kernels' contract (check_mix_pair)
        raise RuntimeError("target_b and lam come together (the blended form needs both), got "
                           f"{'target_b' if lam is None else 'lam'} alone")
    if target_b is None:
        return valid, y, None, None
    yb = torch.where(valid, target_b, 0)
    return valid, y, yb, lam.to(dtype)


def _gathered_mix(z: Tensor, y: Tensor, yb: Tensor | None, lam: Tensor | None) -> Tensor:
    """``mix_i . z_i`` with zero-coefficient terms dropped (so -inf there gives no NaN)."""
    zy = z.gather(1, y[:, None]).squeeze(1) if z.shape[1] else z.new_zeros(z.shape[0])
    if yb is None:
        return zy
    zb = z.gather(1, yb[:, None]).squeeze(1)
    a = torch.where(lam == 0, 0.0, lam * zy)
    b = torch.where(lam == 1, 0.0, (1 - lam) * zb)
    return a + b


def _lse(z: Tensor) -> Tensor:
    if z.shape[1] == 0:
        return z.new_full((z.shape[0],), float("-inf"))
    return torch.logsumexp(z, dim=1)


def wce_forward(logits: Tensor, target: Tensor, target_b: Tensor | None, lam: Tensor | None,
                ignore_index: int) -> tuple[Tensor, Tensor]:
    acc = _acc(logits.dtype)
    z = logits.to(acc)
    lse = _lse(z)
    valid, y, yb, lm = _mix(target, target_b, lam, ignore_index, acc)
    if z.shape[0] == 0 or z.shape[1] == 0:
        loss = torch.zeros_like(lse)
    else:
        loss = torch.where(valid, lse - _gathered_mix(z, y, yb, lm), 0.0)
    out_loss = backend.new_output(z.shape[0], dtype=acc, device=z.device)
    out_lse = backend.new_output(z.shape[0], dtype=acc, device=z.device)
    out_loss.copy_(loss)
    out_lse.copy_(lse)
    return out_loss, out_lse


def _dmix(z: Tensor, y: Tensor, yb: Tensor | None, lam: Tensor | None) -> Tensor:
    """``mix_i`` as a dense [N, C] tensor."""
    d = torch.zeros_like(z)
    if yb is None:
        return d.scatter_(1, y[:, None], 1.0)
    d.scatter_add_(1, y[:, None], lam[:, None])
    d.scatter_add_(1, yb[:, None], (1 - lam)[:, None])
    return d


def wce_backward(grad_loss: Tensor, logits: Tensor, lse: Tensor, target: Tensor, target_b: Tensor | None,
                 lam: Tensor | None, ignore_index: int) -> Tensor:
    acc = _acc(logits.dtype)
    z = logits.to(acc)
    out = backend.new_output(*logits.shape, dtype=logits.dtype, device=logits.device)
    valid, y, yb, lm = _mix(target, target_b, lam, ignore_index, acc)
    if z.numel() == 0:
        return out
    p = torch.exp(z - lse.to(acc)[:, None])
    g = torch.where(valid, grad_loss.to(acc), 0.0)
    d = torch.where(valid[:, None], g[:, None] * (p - _dmix(z, y, yb, lm)), 0.0)
    out.copy_(d)
    return out


def wce_hvp(logits: Tensor, lse: Tensor, scale: Tensor, u: Tensor) -> Tensor:
    acc = _acc(logits.dtype)
    z = logits.to(acc)
    out = backend.new_output(*logits.shape, dtype=logits.dtype, device=logits.device)
    if z.numel() == 0:
        return out
    p = torch.exp(z - lse.to(acc)[:, None])
    pu = p * u.to(acc)
    out.copy_(scale.to(acc)[:, None] * (pu - p * pu.sum(1, keepdim=True)))
    return out


def wce_jvp(logits: Tensor, lse: Tensor, target: Tensor, target_b: Tensor | None, lam: Tensor | None, t: Tensor,
            ignore_index: int) -> Tensor:
    acc = _acc(logits.dtype)
    z = logits.to(acc)
    out = backend.new_output(z.shape[0], dtype=acc, device=z.device)
    valid, y, yb, lm = _mix(target, target_b, lam, ignore_index, acc)
    if z.shape[0] == 0:
        return out
    if z.shape[1] == 0:
        return out.zero_()
    tt = t.to(acc)
    p = torch.exp(z - lse.to(acc)[:, None])
    r = (p * tt).sum(1) - _gathered_mix(tt, y, yb, lm)
    out.copy_(torch.where(valid, r, 0.0))
    return out


def wce_forward_grad(logits: Tensor, target: Tensor, target_b: Tensor | None, lam: Tensor | None,
                     row_scale: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """wce_forward's ``(loss, lse)`` and ``row_scale_i (p_i - mix_i)`` (row_scale None: 1)."""
    loss, lse = wce_forward(logits, target, target_b, lam, ignore_index)
    scale = torch.ones_like(loss) if row_scale is None else row_scale
    return loss, lse, wce_backward(scale, logits, lse, target, target_b, lam, ignore_index)


def wce_softmax_hvp(logits: Tensor, scale: Tensor, u: Tensor) -> Tensor:
    """wce_hvp with the row logsumexp computed here."""
    return wce_hvp(logits, _lse(logits.to(_acc(logits.dtype))), scale, u)


KERNELS = {"wce_forward": wce_forward, "wce_backward": wce_backward, "wce_hvp": wce_hvp, "wce_jvp": wce_jvp,
           "wce_forward_grad": wce_forward_grad, "wce_softmax_hvp": wce_softmax_hvp}
for _name, _fn in KERNELS.items():
    backend.register("reference", _name, _fn)
