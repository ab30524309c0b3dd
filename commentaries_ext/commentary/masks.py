"""Attention-mask commentaries (paper section 3, DESIGN.md 3.3).

A small U-Net maps an image to a logit map; its spatial softmax ``a`` gives a
centroid ``mu = sum_u a(u) u`` (coordinates in ``[0, 1]``, ``(row, col)``), which
centres a Gaussian mask

    m(u) = b + exp(-||u - mu||^2 / (2 sigma^2))       (N x 1 x H x W)

The student trains on ``m * x + (1 - m) * x_bg`` with the background ``x_bg``:
``"zeros"``, ``"mean"`` (per image and channel), ``"blur"`` (a Gaussian blur
of the image) or ``"other"`` (another image of the batch).  ``b > 0``: the mask
is clipped at 1.  Validation batches are never masked.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import BatchError, Commentary, Prepared, check_param_dtype, draw_device
from .blending import blend

BACKGROUNDS = ("zeros", "mean", "blur", "other")


class SmallUNet(nn.Module):
    """Two-level U-Net: ``[N, C, H, W] -> [N, 1, H, W]`` logits."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        w = int(width)
        self.enc1 = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(w, w, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.up = nn.Conv2d(2 * w, w, 1)
        self.dec = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 1))

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        u = F.interpolate(self.up(e2), size=e1.shape[-2:], mode="bilinear", align_corners=False)
        return self.dec(torch.cat([e1, u], dim=1))


def _grid(h: int, w: int, dtype, device):
    r = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
    c = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
    return r, c


def gaussian_blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    k = max(3, int(2 * math.ceil(2 * sigma) + 1))
    t = torch.arange(k, dtype=x.dtype, device=x.device) - (k - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    c = x.shape[1]
    pad = k // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, g.view(1, 1, 1, k).expand(c, 1, 1, k).contiguous(), groups=c)
    return F.conv2d(y, g.view(1, 1, k, 1).expand(c, 1, k, 1).contiguous(), groups=c)


class AttentionMask(Commentary):
    """U-Net -> spatial softmax -> centroid -> Gaussian mask -> masked blend.

    ``sigma`` is in units of the image size (coordinates are in ``[0, 1]``);
    ``temperature`` divides the logits before the spatial softmax.
    """

    kind = "attention_mask"

    def __init__(self, in_channels: int, *, num_classes: int | None = None, sigma: float = 0.2, b: float = 0.0,
                 background: str = "zeros", blur_sigma: float = 1.5, width: int = 16, temperature: float = 1.0):
        super().__init__(num_classes)
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        if sigma <= 0 or temperature <= 0:
            raise ValueError("sigma and temperature must be positive")
        self.in_channels = int(in_channels)
        self.sigma, self.b, self.background = float(sigma), float(b), background
        self.blur_sigma, self.width, self.temperature = float(blur_sigma), int(width), float(temperature)
        self.net = SmallUNet(self.in_channels, self.width)

    def _draw(self, batch: dict, generator) -> None:
        x = batch["x"]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BatchError(f"AttentionMask expects images [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        check_param_dtype("AttentionMask", x, next(self.net.parameters()))
        if self.background == "other":
            n = x.shape[0]
            # a derangement when possible: nobody is its own background
            s = torch.randperm(n, generator=generator, device=draw_device(generator))
            perm = torch.empty_like(s)
            perm[s] = torch.roll(s, -1)
            batch["perm"] = perm.to(x.device)

    def input_mismatch(self, shape) -> str | None:
        # the U-Net takes any height and width, but its first convolution has in_channels inputs
        if len(shape) != 3 or int(shape[0]) != self.in_channels:
            return f"the mask network takes images [{self.in_channels}, H, W]"
        return None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial softmax ``[N, H, W]``."""
        z = self.net(x)[:, 0] / self.temperature
        n, h, w = z.shape
        # at least float32 (half inputs under autocast), float64 kept
        z = z.reshape(n, h * w).to(torch.promote_types(z.dtype, torch.float32))
        return torch.softmax(z, dim=1).reshape(n, h, w).to(x.dtype)

    def centroid(self, a: torch.Tensor) -> torch.Tensor:
        """``mu [N, 2]`` (row, col) in ``[0, 1]`` from the attention map."""
        r, c = _grid(a.shape[1], a.shape[2], a.dtype, a.device)
        return torch.stack([(a.sum(2) * r).sum(1), (a.sum(1) * c).sum(1)], dim=1)

    def mask_from_centroid(self, mu: torch.Tensor, h: int, w: int) -> torch.Tensor:
        r, c = _grid(h, w, mu.dtype, mu.device)
        d2 = (r.view(1, h, 1) - mu[:, 0].view(-1, 1, 1)) ** 2 + (c.view(1, 1, w) - mu[:, 1].view(-1, 1, 1)) ** 2
        m = self.b + torch.exp(-d2 / (2 * self.sigma ** 2))
        if self.b > 0:
            m = m.clamp(max=1.0)
        return m.unsqueeze(1)

    def background_of(self, x: torch.Tensor, batch: dict | None = None):
        """``(x_b, perm)`` for :func:`blend`."""
        if self.background == "zeros":
            return None, None
        if self.background == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous(), None
        if self.background == "blur":
            return gaussian_blur(x, self.blur_sigma), None
        perm = None if batch is None else batch.get("perm")
        if perm is None:
            perm = torch.roll(torch.arange(x.shape[0], device=x.device), 1)
        return None, perm

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m [N, 1, H, W], mu [N, 2])``."""
        a = self.attention(x)
        mu = self.centroid(a)
        return self.mask_from_centroid(mu, x.shape[2], x.shape[3]), mu

    def forward(self, batch: dict) -> Prepared:
        x, y = batch["x"], batch["y"]
        m, mu = self.masks(x)
        x_b, perm = self.background_of(x, batch)
        x_t = blend(x, m, perm=perm, x_b=x_b)
        return Prepared(x=x_t, target=y, reduction="mean", extras={"mask": m, "centroid": mu})

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "sigma": self.sigma, "b": self.b,
                "background": self.background, "blur_sigma": self.blur_sigma, "width": self.width,
                "temperature": self.temperature}

    @classmethod
    def from_config(cls, cfg: dict, net=None) -> "AttentionMask":
        cfg = dict(cfg)
        return cls(cfg.pop("in_channels"), **cfg)

    def plot(self, x=None, y=None, **kw):
        """:meth:`Commentary.plot`: the masks of ``x``'s first ``max_images`` (``y`` is ignored)."""
        from .plots import plot_masks

        if x is None:
            raise TypeError("AttentionMask.plot needs images: plot(x), e.g. plot(x_val[:256], y_val[:256])")
        return plot_masks(self, x, **kw)
