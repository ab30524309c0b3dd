"""Example-weighting commentaries (paper section 3, DESIGN.md 3.1).

* :class:`TeacherNet` -- the reference teacher network: image plus the training
  progress ``i/T`` as an extra constant channel (optionally the label),
  conv5x5 s2 (32) -> BN -> ReLU -> maxpool3 s2 -> conv3x3 s2 (64) -> BN -> ReLU
  -> maxpool3 s2 -> linear -> (sigmoid in :class:`ExampleWeighting`).
* :class:`ExampleWeighting` -- ``w_i = sigmoid(net(x_i, i/T[, y_i]))`` for the
  reference teacher or any user network returning one logit per example.
* :class:`TabularWeighting` -- one weight per training example (addressed by
  its dataset index), optionally one per example and progress bin.

The training loss is ``reduce_i w_i * CE_i`` with ``reduction`` ``"mean"``
(divide by N; the default, PyTorch's convention and the CLI's, so that a learning
rate tuned for ``F.cross_entropy`` fits), ``"sum"`` (the paper's reference code,
used with Adam, which is invariant to the loss scale; with SGD it multiplies the
step by the batch size) or ``"normalized"`` (divide by sum w).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import REDUCTIONS, BatchError, Commentary, Prepared, check_param_dtype, kept_buffers


# a commentary file whose config has no "reduction" was written when the default was "sum"
_FILE_REDUCTION = "sum"


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


class TeacherNet(nn.Module):
    """The reference teacher trunk; returns one logit per example ``[N]``.

    ``in_shape = (C, H, W)`` of the images (without the progress channel);
    ``num_classes`` given and ``use_label=True``: the one-hot label is appended
    to the features before the linear layer.
    """

    def __init__(self, in_shape, num_classes: int | None = None, *, use_label: bool = False,
                 progress_channel: bool = True, width: tuple[int, int] = (32, 64)):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        if use_label and not num_classes:
            raise ValueError("use_label=True needs num_classes")
        self.in_shape = (c, h, w)
        self.num_classes = num_classes
        self.use_label = bool(use_label)
        self.progress_channel = bool(progress_channel)
        c1, c2 = width
        self.features = nn.Sequential(
            nn.Conv2d(c + int(self.progress_channel), c1, 5, stride=2, padding=2),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
        )
        with torch.no_grad():
            was = self.features.training
            self.features.eval()
            n_feat = self.features(torch.zeros(1, c + int(self.progress_channel), h, w)).shape[1]
            self.features.train(was)
        self.head = nn.Linear(n_feat + (num_classes if self.use_label else 0), 1)

    def forward(self, x: torch.Tensor, progress: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise BatchError(f"TeacherNet expects images of shape {self.in_shape}, got {tuple(x.shape[1:])}")
        check_param_dtype("TeacherNet", x, self.head.weight)
        if self.progress_channel:
            t = progress.to(x.dtype).view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
            x = torch.cat([x, t], dim=1)
        f = self.features(x)
        if self.use_label:
            # (one_hot checks the label range on the data: not traceable by the engine's linearised HVP)
            onehot = (y[:, None] == torch.arange(self.num_classes, device=y.device)).to(f.dtype)
            f = torch.cat([f, onehot], dim=1)
        return self.head(f).squeeze(1)


class ExampleWeighting(Commentary):
    """``w_i = sigmoid(net(x_i, progress_i[, y_i]))`` and a weighted training loss.

    ``net`` is any module called as ``net(x, progress, y)`` (or ``net(x)`` with
    ``call="x"``) that returns ``[N]`` or ``[N, 1]`` logits.  Build the reference
    teacher with :meth:`ExampleWeighting.reference`.
    """

    kind = "example_weighting"

    def __init__(self, net: nn.Module, *, num_classes: int | None = None, reduction: str = "mean",
                 call: str = "x_progress_y", _config: dict | None = None):
        super().__init__(num_classes)
        if call not in ("x_progress_y", "x"):
            raise ValueError(f"call must be 'x_progress_y' or 'x', got {call!r}")
        self.net = net
        self.reduction = _check_reduction(reduction)
        self.call = call
        self._config = _config

    @classmethod
    def reference(cls, in_shape, num_classes: int | None = None, *, use_label: bool = False,
                  progress_channel: bool = True, reduction: str = "mean") -> "ExampleWeighting":
        """The reference teacher network (paper / reference code)."""
        net = TeacherNet(in_shape, num_classes, use_label=use_label, progress_channel=progress_channel)
        cfg = {"net": "teacher", "in_shape": list(net.in_shape), "num_classes": num_classes,
               "use_label": bool(use_label), "progress_channel": bool(progress_channel), "reduction": reduction}
        return cls(net, num_classes=num_classes, reduction=reduction, _config=cfg)

    def input_mismatch(self, shape) -> str | None:
        # the reference teacher's linear head is sized for one image shape; a user network is not known
        if isinstance(self.net, TeacherNet) and tuple(int(s) for s in shape) != self.net.in_shape:
            return (f"the reference teacher network takes examples of shape {list(self.net.in_shape)} (its "
                    "linear layer is sized for them)")
        return None

    def weight_logits(self, x, progress, y):
        z = self.net(x, progress, y) if self.call == "x_progress_y" else self.net(x)
        if z.dim() == 2 and z.shape[1] == 1:
            z = z.squeeze(1)
        if z.shape != (x.shape[0],):
            raise BatchError(f"the weighting network must return [N] or [N, 1] logits, got {tuple(z.shape)}")
        return z

    def forward(self, batch: dict) -> Prepared:
        x, y = batch["x"], batch["y"]
        w = torch.sigmoid(self.weight_logits(x, batch["progress"], y))
        return Prepared(x=x, target=y, weight=w, reduction=self.reduction)

    @torch.no_grad()
    def weights(self, x, y, progress=0.0, *, batch_size: int | None = None) -> torch.Tensor:
        """The weights of ``(x, y)`` at training progress ``i/T`` (no grad), as a student's step
        receives them: in the module's mode -- learning and reuse run it in training mode, where
        the reference teacher's BatchNorm normalises with each batch's statistics, so pass the
        student's ``batch_size`` (None: all of ``x`` as one batch).  Running statistics are left
        unchanged."""
        n = x.shape[0]
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        bs = max(n, 1) if batch_size is None else int(batch_size)
        starts = list(range(0, max(n, 1), bs))
        if len(starts) > 1 and n - starts[-1] == 1:  # a last batch of one: BatchNorm cannot normalise it
            starts.pop()
        ends = starts[1:] + [n]
        with kept_buffers(self):
            return torch.cat([self(self.prepare(x[a:b], y[a:b], progress=progress)).weight
                              for a, b in zip(starts, ends)])

    def config(self) -> dict:
        if self._config is None:
            return {"net": "user", "num_classes": self.num_classes, "reduction": self.reduction, "call": self.call}
        return dict(self._config)

    @classmethod
    def from_config(cls, cfg: dict, net: nn.Module | None = None) -> "ExampleWeighting":
        if cfg.get("net") == "teacher":
            return cls.reference(cfg["in_shape"], cfg.get("num_classes"), use_label=cfg.get("use_label", False),
                                 progress_channel=cfg.get("progress_channel", True),
                                 reduction=cfg.get("reduction", _FILE_REDUCTION))
        if net is None:
            raise ValueError("this commentary file holds a user network: pass the network module "
                             "(load_commentary(path, commentary=ExampleWeighting(your_net, ...)))")
        return cls(net, num_classes=cfg.get("num_classes"), reduction=cfg.get("reduction", _FILE_REDUCTION),
                   call=cfg.get("call", "x_progress_y"))

    def plot(self, x=None, y=None, **kw):
        """:meth:`Commentary.plot`: the weights of the examples ``(x, y)`` (both needed)."""
        from .plots import plot_weights

        if x is None or y is None:
            raise TypeError("ExampleWeighting.plot needs a batch: plot(x, y), e.g. plot(x_val[:256], y_val[:256])")
        return plot_weights(self, x, y, **kw)


class TabularWeighting(Commentary):
    """One weight per training example: ``w_i = sigmoid(phi[index_i, bin(progress)])``.

    ``num_bins > 1`` gives a weight per example and stretch of training
    (progress in ``[0, 1]`` split into equal bins).  ``init`` is the initial
    logit (``0`` -> weight 0.5; the reference code's tabular weights).
    """

    kind = "example_weighting"
    needs_index = True

    def __init__(self, num_examples: int, *, num_bins: int = 1, num_classes: int | None = None,
                 reduction: str = "mean", init: float = 0.0):
        super().__init__(num_classes)
        if num_examples <= 0 or num_bins <= 0:
            raise ValueError(f"num_examples and num_bins must be positive, got {num_examples}, {num_bins}")
        self.num_examples = int(num_examples)
        self.num_bins = int(num_bins)
        self.reduction = _check_reduction(reduction)
        self.init = float(init)
        self.logits = nn.Parameter(torch.full((self.num_examples, self.num_bins), float(init)))

    def _bins(self, progress: torch.Tensor) -> torch.Tensor:
        return (progress.clamp(0, 1) * self.num_bins).long().clamp_max(self.num_bins - 1)

    def forward(self, batch: dict) -> Prepared:
        idx = batch.get("index")
        if idx is None:
            raise BatchError("TabularWeighting needs the example indices in the batch (prepare(..., index=))")
        z = self.logits[idx, self._bins(batch["progress"])]
        return Prepared(x=batch["x"], target=batch["y"], weight=torch.sigmoid(z), reduction=self.reduction)

    @torch.no_grad()
    def weights(self, index: torch.Tensor | None = None, progress: float = 0.0) -> torch.Tensor:
        idx = torch.arange(self.num_examples) if index is None else index.long()
        b = self._bins(torch.full(idx.shape, float(progress)))
        return torch.sigmoid(self.logits[idx, b])

    def config(self) -> dict:
        return {"num_examples": self.num_examples, "num_bins": self.num_bins, "num_classes": self.num_classes,
                "reduction": self.reduction, "init": self.init}

    @classmethod
    def from_config(cls, cfg: dict, net=None) -> "TabularWeighting":
        return cls(cfg["num_examples"], num_bins=cfg.get("num_bins", 1), num_classes=cfg.get("num_classes"),
                   reduction=cfg.get("reduction", _FILE_REDUCTION), init=cfg.get("init", 0.0))

    def plot(self, x=None, y=None, *, labels=None, **kw):
        """:meth:`Commentary.plot`: ``x, y`` are ignored; ``labels``: the class of every
        training example (``[num_examples]``) for the per-class panel."""
        from .plots import plot_tabular_weights

        if labels is None and y is None and torch.is_tensor(x) and not x.is_floating_point():
            labels = x  # the older call plot(labels)
        return plot_tabular_weights(self, labels, **kw)
