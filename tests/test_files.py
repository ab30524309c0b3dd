"""Commentary files: bit-exact round trips, metadata, refusal of mismatched data /
models / modules with every mismatch named, atomic writes, no code execution."""
import json
import os

import pytest
import torch
from torch import nn

from commentaries_ext import _atomic, files
from commentaries_ext.commentary import AttentionMask, Blending, ExampleWeighting, TabularWeighting
from commentaries_ext.files import (
    CommentaryFileError,
    CommentaryMismatchError,
    dataset_fingerprint,
    load_commentary,
    read_metadata,
    save_commentary,
)


def _data(n=20, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g)


def _randomise(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in m.parameters():
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
        for t in m.buffers():  # running statistics: positive
            if t.is_floating_point():
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
    return m


@pytest.mark.parametrize("make", [
    lambda: ExampleWeighting.reference((1, 8, 8), 3, use_label=True, reduction="normalized"),
    lambda: TabularWeighting(20, num_bins=3, num_classes=3),
    lambda: Blending(3),
    lambda: AttentionMask(1, num_classes=3, background="blur", sigma=0.3, width=4),
])
def test_round_trip_is_bit_exact(tmp_path, make):
    x, y = _data()
    c = _randomise(make())
    path = save_commentary(tmp_path / "c.commentary", c, data=(x, y), learned_with={"algorithm": "ift", "steps": 5})
    c2 = load_commentary(path, data=(x, y), model=nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    assert type(c2) is type(c) and c2.config() == c.config()
    sd1, sd2 = c.state_dict(), c2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    meta = read_metadata(path)
    assert meta["kind"] == c.kind and meta["class"] == type(c).__name__ and meta["num_classes"] == 3
    assert meta["data"]["size"] == 20 and meta["input_shape"] == [1, 8, 8]
    assert meta["learned_with"] == {"algorithm": "ift", "steps": 5}
    assert meta["library_version"] and meta["torch_version"] == torch.__version__
    assert all(meta["tensors"][k]["shape"] == list(v.shape) for k, v in sd1.items())
    # and the loaded commentary behaves the same
    c.eval(), c2.eval()
    b = c.prepare(x, y, index=torch.arange(20), progress=0.5, generator=torch.Generator().manual_seed(0))
    b2 = c2.prepare(x, y, index=torch.arange(20), progress=0.5, generator=torch.Generator().manual_seed(0))
    p1, p2 = c(b), c2(b2)
    assert torch.equal(p1.x, p2.x)
    if p1.weight is not None:
        assert torch.equal(p1.weight, p2.weight)


def test_refuses_mismatched_dataset_and_names_every_problem(tmp_path):
    x, y = _data()
    c = Blending(3)
    path = save_commentary(tmp_path / "b.commentary", c, data=(x, y))
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 3
    with pytest.raises(CommentaryMismatchError, match="data fingerprint") as e:
        load_commentary(path, data=(x, y2))
    assert len(e.value.problems) == 1
    with pytest.raises(CommentaryMismatchError) as e:
        load_commentary(path, data=_data(n=10), model=nn.Sequential(nn.Flatten(), nn.Linear(64, 4)))
    text = str(e.value)
    assert "data size: file was learned on 20 examples, the data has 10" in text
    assert "model: it outputs 4 classes, the commentary was learned with 3" in text
    assert "data fingerprint" in text
    with pytest.raises(CommentaryMismatchError, match="num_classes: file has 3, expected 5"):
        load_commentary(path, num_classes=5)
    # reuse on other data on purpose
    assert load_commentary(path, data=(x, y2), check_data=False) is not None


def test_reuse_on_data_of_another_shape(tmp_path):
    # check_data=False: the student is probed with the new data's examples, not the file's
    x, y = _data()
    x12, y12 = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    student12 = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    path = save_commentary(tmp_path / "b.commentary", Blending(3), data=(x, y))
    assert isinstance(load_commentary(path, data=(x12, y12), check_data=False, model=student12), Blending)
    with pytest.raises(CommentaryMismatchError) as e:  # checked, the shapes differ too
        load_commentary(path, data=(x12, y12), model=student12)
    assert "data shapes" in str(e.value) and "model" not in str(e.value)
    # the mask U-Net takes any height and width, not another channel count
    path = save_commentary(tmp_path / "m.commentary", AttentionMask(1, num_classes=3, width=4), data=(x, y))
    assert isinstance(load_commentary(path, data=(x12, y12), check_data=False, model=student12), AttentionMask)
    with pytest.raises(CommentaryMismatchError) as e:
        load_commentary(path, data=(x12.expand(6, 3, 12, 12), y12), check_data=False)
    assert e.value.problems == ["input shape: the mask network takes images [1, H, W]; the data has examples of "
                                "shape [3, 12, 12], so this AttentionMask cannot be applied to it"]
    # the reference teacher's linear layer is sized for the file's images: a clear refusal, not a matmul error
    path = save_commentary(tmp_path / "w.commentary", ExampleWeighting.reference((1, 8, 8), 3), data=(x, y))
    with pytest.raises(CommentaryMismatchError) as e:
        load_commentary(path, data=(x12, y12), check_data=False, model=student12)
    assert e.value.problems == ["input shape: the reference teacher network takes examples of shape [1, 8, 8] "
                                "(its linear layer is sized for them); the data has examples of shape [1, 12, 12], "
                                "so this ExampleWeighting cannot be applied to it"]


def test_refuses_mismatched_module(tmp_path):
    x, y = _data()
    path = save_commentary(tmp_path / "b.commentary", Blending(3), data=(x, y))
    with pytest.raises(CommentaryMismatchError) as e:
        load_commentary(path, commentary=Blending(4))
    assert "tensor 'phi': shape [3, 3] in the file, [4, 4] in the module" in str(e.value)
    assert "num_classes: file has 3, the given module has 4" in str(e.value)
    with pytest.raises(CommentaryMismatchError, match="class: file has Blending"):
        load_commentary(path, commentary=TabularWeighting(3))


def test_user_network_needs_the_module(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    c = _randomise(ExampleWeighting(net, call="x", num_classes=3))
    path = save_commentary(tmp_path / "u.commentary", c)
    with pytest.raises(ValueError, match="user network"):
        load_commentary(path)
    c2 = load_commentary(path, commentary=ExampleWeighting(nn.Sequential(nn.Flatten(), nn.Linear(64, 1)), call="x",
                                                           num_classes=3))
    assert all(torch.equal(a, b) for a, b in zip(c.parameters(), c2.parameters()))
    with pytest.raises(CommentaryMismatchError, match="stores no data fingerprint"):
        load_commentary(path, commentary=c2, data=_data())


def test_loading_into_a_module_with_another_reduction_is_refused(tmp_path):
    """The file's reduction against the given module's (a "sum" file loaded into a module built
    with today's default "mean" scaled the loss by 1/N silently); a file written before the key
    existed holds "sum"."""
    def mk(**kw):
        return ExampleWeighting(nn.Sequential(nn.Flatten(), nn.Linear(64, 1)), call="x", num_classes=3, **kw)

    path = save_commentary(tmp_path / "s.commentary", mk(reduction="sum"))
    with pytest.raises(CommentaryMismatchError, match="reduction: file has 'sum', the given module has 'mean'"):
        load_commentary(path, commentary=mk())
    assert load_commentary(path, commentary=mk(reduction="sum")).reduction == "sum"
    meta = files.read_metadata(path)
    assert meta["config"]["reduction"] == "sum"


def test_loading_into_a_module_with_another_config_is_refused(tmp_path):
    path = save_commentary(tmp_path / "b.commentary", Blending(3, alpha=1.0))
    with pytest.raises(CommentaryMismatchError, match="config alpha: file has 1.0, the given module has 0.25"):
        load_commentary(path, commentary=Blending(3, alpha=0.25))
    assert load_commentary(path, commentary=Blending(3, alpha=1.0)).alpha == 1.0


def test_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.commentary"
    old = Blending(3)
    save_commentary(path, old)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(_atomic.os, "fsync", crash)
    with pytest.raises(OSError, match="mid-write"):
        save_commentary(path, _randomise(Blending(3)))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.commentary"]  # no temporary left behind
    assert torch.equal(load_commentary(path).phi, old.phi)


def test_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "junk.commentary"
    p.write_bytes(b"\x00" * 5)
    with pytest.raises(CommentaryFileError):
        load_commentary(p)
    q = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(q))
    with pytest.raises(CommentaryFileError, match="not a commentary file"):
        load_commentary(q)
    with pytest.raises(FileNotFoundError):
        load_commentary(tmp_path / "missing")
    # a file naming a class outside the registry is refused, never imported
    meta = {"format": files.FORMAT, "kind": "x", "class": "os.system", "config": {"command": "touch pwned"}}
    r = tmp_path / "evil.commentary"
    save_file({"phi": torch.zeros(1)}, str(r), metadata={files.META_KEY: json.dumps(meta)})
    with pytest.raises(CommentaryFileError, match="unknown commentary class 'os.system'"):
        load_commentary(r)
    assert not os.path.exists("touch pwned") and not (tmp_path / "pwned").exists()
    meta["format"] = "pickle"
    save_file({"phi": torch.zeros(1)}, str(r), metadata={files.META_KEY: json.dumps(meta)})
    with pytest.raises(CommentaryFileError, match="unsupported format"):
        read_metadata(r)


def test_a_changed_byte_is_refused_not_loaded(tmp_path):
    """Every commentary file carries a sha256 of its metadata and tensors: a flipped bit in a
    tensor's data or in a config number (Blending's alpha 1 -> 3) is refused as corrupted; both
    loaded silently, changing the commentary."""
    c = _randomise(Blending(4, alpha=1.0))
    p = save_commentary(tmp_path / "b.commentary", c)
    blob = p.read_bytes()
    flipped = bytearray(blob)
    flipped[-3] ^= 1  # a bit of the last tensor value
    (tmp_path / "t.commentary").write_bytes(bytes(flipped))
    with pytest.raises(CommentaryFileError, match="corrupted"):
        load_commentary(tmp_path / "t.commentary")
    key = b'alpha\\": 1.0'  # in the safetensors header the metadata JSON is itself a JSON string
    i = blob.index(key)
    edited = blob[:i] + key.replace(b"1.0", b"3.0") + blob[i + len(key):]
    (tmp_path / "m.commentary").write_bytes(edited)
    with pytest.raises(CommentaryFileError, match="corrupted"):
        load_commentary(tmp_path / "m.commentary")
    back = load_commentary(p)
    assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(), back.state_dict().values()))


def test_a_float64_commentary_comes_back_float64(tmp_path):
    c = _randomise(Blending(3)).double()
    back = load_commentary(save_commentary(tmp_path / "d.commentary", c))
    assert back.phi.dtype == torch.float64 and torch.equal(back.phi, c.phi)


def test_fingerprint():
    x, y = _data()
    f = dataset_fingerprint((x, y))
    assert f == dataset_fingerprint(torch.utils.data.TensorDataset(x, y))
    assert f == dataset_fingerprint(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7))
    assert f["sha256"] != dataset_fingerprint((x[torch.randperm(20)], y))["sha256"]
    assert f["sha256"] != dataset_fingerprint((x.double(), y))["sha256"]
    assert f["size"] == 20 and f["shapes"] == [[1, 8, 8], []]
