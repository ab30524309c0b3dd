"""Label-dependent blending augmentation (paper section 3, DESIGN.md 3.2).

``phi`` is a ``C x C`` matrix (initialised to -1).  Example ``i`` is blended
with a partner ``j = perm[i]`` (a random permutation of the minibatch):

    lam_i = 1 - 0.5 * sigmoid(phi[y_i, y_j])  in (0.5, 1)
    x~_i  = lam_i x_i + (1 - lam_i) x_j
    loss  = mean_i [ lam_i CE(f(x~_i), y_i) + (1 - lam_i) CE(f(x~_i), y_j) ]

The baselines are the same module with a fixed policy: ``"none"`` (no
blending), ``"random"`` (``lam ~ U(0.5, 1)`` per example) and ``"mixup"``
(``lam ~ Beta(alpha, alpha)``, one per batch).  Validation batches are never
blended (:func:`commentaries_ext.commentary.base.validation_loss`).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Commentary, Prepared, draw_device

POLICIES = ("learned", "none", "random", "mixup")


def blend(x_a: torch.Tensor, m: torch.Tensor, perm: torch.Tensor | None = None,
          x_b: torch.Tensor | None = None) -> torch.Tensor:
    """``m * x_a + (1 - m) * x_b`` with ``x_b = x_a[perm]`` when ``perm`` is given
    (``x_b`` and ``perm`` both None: zeros).  ``m`` is ``[N]`` (per example) or
    broadcastable to ``x_a`` (per pixel / channel)."""
    if m.dim() == 1:
        m = m.view(-1, *([1] * (x_a.dim() - 1)))
    m = m.to(x_a.dtype)
    if x_b is not None:  # e.g. a blurred background computed in half precision under autocast
        x_b = x_b.to(x_a.dtype)
    if x_b is None and perm is None:  # zeros background (the fused op would blend x_a with itself)
        return m * x_a
    fused = _masked_blend()
    if fused is not None and not _fused_dtype_ok(x_a):
        fused = None  # e.g. float16 on the CPU: plain PyTorch
    if fused is not None:
        return fused(x_a, m.expand(x_a.shape[0], *m.shape[1:]), x_b=x_b, perm=perm)
    if perm is not None:
        x_b = x_a[perm] if x_b is None else x_b[perm]
    if x_b is None:
        return m * x_a
    return m * x_a + (1 - m) * x_b


def _fused_dtype_ok(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64)
    return x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _masked_blend():
    from .base import fused_blend_enabled

    if not fused_blend_enabled():
        return None
    from ..ops.blend import masked_blend  # part of the package: a failing import is a bug, not a fallback

    return masked_blend


class Blending(Commentary):
    """Label-dependent blending; ``policy="learned"`` holds the learnable ``C x C`` matrix."""

    kind = "blending"

    def __init__(self, num_classes: int, *, policy: str = "learned", init: float = -1.0, alpha: float = 1.0):
        super().__init__(num_classes)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        if alpha <= 0:
            raise ValueError(f"alpha (mixup Beta parameter) must be positive, got {alpha}")
        self.policy = policy
        self.init = float(init)
        self.alpha = float(alpha)
        if policy == "learned":
            self.phi = nn.Parameter(torch.full((num_classes, num_classes), float(init)))
        else:
            self.register_parameter("phi", None)

    def _draw(self, batch: dict, generator) -> None:
        if self.policy == "none":
            return
        x = batch["x"]
        n = x.shape[0]
        batch["perm"] = torch.randperm(n, generator=generator, device=draw_device(generator)).to(x.device)
        if self.policy == "random":
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=draw_device(generator))
            batch["lam"] = (0.5 + 0.5 * u).to(x.dtype).to(x.device)
        elif self.policy == "mixup":
            g = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
            if generator is not None:  # Beta from two Gammas with our generator
                a = _gamma(self.alpha, generator)
                b = _gamma(self.alpha, generator)
                lam = a / (a + b)
            else:
                lam = float(g.sample())
            batch["lam"] = torch.full((n,), float(lam), dtype=x.dtype, device=x.device)

    def coefficients(self, y: torch.Tensor, y_partner: torch.Tensor) -> torch.Tensor:
        """``lam = 1 - 0.5 sigmoid(phi[y, y_partner])`` (learned policy)."""
        return 1 - 0.5 * torch.sigmoid(self.phi[y, y_partner])

    def forward(self, batch: dict) -> Prepared:
        x, y = batch["x"], batch["y"]
        if self.policy == "none":
            return Prepared(x=x, target=y, reduction="mean")
        perm = batch.get("perm")
        if perm is None:
            raise ValueError("this batch has no blending partners: build it with Blending.prepare(x, y)")
        y_b = y[perm]
        lam = self.coefficients(y, y_b) if self.policy == "learned" else batch["lam"]
        x_t = blend(x, lam, perm=perm)
        return Prepared(x=x_t, target=y, target_b=y_b, lam=lam, reduction="mean")

    @torch.no_grad()
    def matrix(self) -> torch.Tensor:
        """The blending coefficient ``lam`` for every class pair ``[C, C]`` (learned policy)."""
        if self.phi is None:
            raise ValueError(f"policy {self.policy!r} has no learned matrix")
        return 1 - 0.5 * torch.sigmoid(self.phi.detach())

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "policy": self.policy, "init": self.init, "alpha": self.alpha}

    @classmethod
    def from_config(cls, cfg: dict, net=None) -> "Blending":
        return cls(cfg["num_classes"], policy=cfg.get("policy", "learned"), init=cfg.get("init", -1.0),
                   alpha=cfg.get("alpha", 1.0))

    def plot(self, x=None, y=None, *, class_names=None, **kw):
        """:meth:`Commentary.plot`: the learned matrix; ``x, y`` are ignored."""
        from .plots import plot_blending

        if x is not None and not torch.is_tensor(x) and class_names is None:
            class_names = x  # the older call plot(class_names)
        return plot_blending(self, class_names, **kw)


def _gamma(alpha: float, generator: torch.Generator) -> float:
    """A Gamma(alpha, 1) sample from ``generator`` (Marsaglia-Tsang)."""
    boost = 1.0
    if alpha < 1:
        u = float(torch.rand((), generator=generator, dtype=torch.float64, device=draw_device(generator)))
        boost = u ** (1.0 / alpha)
        alpha += 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    while True:
        z = float(torch.randn((), generator=generator, dtype=torch.float64, device=draw_device(generator)))
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator, dtype=torch.float64, device=draw_device(generator)))
        import math

        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v * boost
