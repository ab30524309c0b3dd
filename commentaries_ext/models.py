"""Student architectures.

* :class:`ConvNet` -- the reference student: conv5x5 s2 (32) -> BN -> ReLU ->
  maxpool3 s2 -> conv3x3 s2 (64) -> BN -> ReLU -> maxpool3 s2 -> linear
  (the trunk of the reference teacher with a class head);
* :class:`MLP` -- flatten -> hidden layers with ReLU -> linear;
* :class:`SmallResNet` -- a different architecture for the reuse study: a 3x3
  stem and two residual blocks (the second with stride 2), global average pool.

:func:`make_student` builds one by name: ``"convnet"``, ``"mlp"``, ``"resnet"``.
"""
from __future__ import annotations

import torch
from torch import nn

ARCHITECTURES = ("convnet", "mlp", "resnet")


class ConvNet(nn.Module):
    def __init__(self, in_shape, num_classes: int, width: tuple[int, int] = (32, 64)):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        c1, c2 = width
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, stride=2, padding=2), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.features.eval()(torch.zeros(1, c, h, w)).shape[1]
        self.features.train()
        self.head = nn.Linear(n, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, in_shape, num_classes: int, hidden: tuple[int, ...] = (128, 64)):
        super().__init__()
        d = 1
        for s in in_shape:
            d *= int(s)
        layers: list[nn.Module] = [nn.Flatten()]
        for hdim in hidden:
            layers += [nn.Linear(d, hdim), nn.ReLU()]
            d = hdim
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, in_shape, num_classes: int, width: int = 16):
        super().__init__()
        c = int(in_shape[0])
        stem_stride = 2 if int(in_shape[-1]) >= 16 else 1
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _Block(width, width, 1)
        self.block2 = _Block(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_student(arch: str, in_shape, num_classes: int) -> nn.Module:
    """A fresh student of architecture ``arch`` (one of :data:`ARCHITECTURES`)."""
    if arch == "convnet":
        return ConvNet(in_shape, num_classes)
    if arch == "mlp":
        return MLP(in_shape, num_classes)
    if arch == "resnet":
        return SmallResNet(in_shape, num_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def student_factory(arch: str, in_shape, num_classes: int, seed: int | None = None):
    """A callable returning a fresh student. With ``seed``, torch's global generator is seeded
    *here*, when the factory is made (``torch.manual_seed(seed)``): the students come from that
    stream, and a loop that restores the stream from its checkpoint (``learn_bptt``) builds the
    same students after a resume. (Seeding at the first call instead re-seeded on every resume,
    and a caller that called the factory once more -- to read shapes -- used the seed up.)"""
    if seed is not None:
        torch.manual_seed(seed)
    return lambda: make_student(arch, in_shape, num_classes)
