"""Commentary files: save a learned commentary with its dataset and reuse it.

A commentary file is one ``safetensors`` file: the commentary's tensors (its
``state_dict``) plus JSON metadata under the key ``"commentaries_ext"``:

    format, kind, class, config (constructor arguments), tensors (shape and
    dtype of each), num_classes, num_examples, input_shape, data (fingerprint
    and size of the training data), library and torch versions, learned_with
    (how it was learned: algorithm, steps, learning rates ...), created.

Loading never executes code from the file (no pickle): the module is rebuilt
from a fixed registry of classes and its JSON constructor arguments, or the
caller passes the module to load into.  The metadata is checked against the
data, student model and module it is applied to, and every mismatch is listed
in one :class:`CommentaryMismatchError`.  Writes are atomic: the file is written
to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash mid-write leaves the old file intact.

    save_commentary("digits.commentary", commentary, data=(x_train, y_train),
                    learned_with={"algorithm": "ift", "steps": 1000})
    c = load_commentary("digits.commentary", data=(x_train, y_train), model=student)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

FORMAT = "commentaries_ext.commentary/1"
META_KEY = "commentaries_ext"


class CommentaryFileError(ValueError):
    """Not a (readable) commentary file."""


class CommentaryMismatchError(ValueError):
    """The file does not match the data / model / module it is applied to.

    ``problems`` lists every mismatch found."""

    def __init__(self, path, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"commentary file {path} does not match:\n  - " + "\n  - ".join(self.problems))


# --------------------------------------------------------------------------- fingerprints


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())


def _as_tensors(data: Any) -> list[torch.Tensor]:
    """Tensors of ``data``: a tensor, a tuple/list of tensors, a TensorDataset, a
    Dataset (stacked items) or a DataLoader-like iterable of batches."""
    if torch.is_tensor(data):
        return [data]
    if isinstance(data, (tuple, list)) and all(torch.is_tensor(t) for t in data):
        return list(data)
    if isinstance(data, torch.utils.data.TensorDataset):
        return list(data.tensors)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        cols = list(zip(*[it if isinstance(it, (tuple, list)) else (it,) for it in items]))
        return [torch.stack([torch.as_tensor(v) for v in col]) for col in cols]
    if isinstance(data, Iterable):
        parts: list[list[torch.Tensor]] = []
        for b in data:
            b = b if isinstance(b, (tuple, list)) else (b,)
            if not parts:
                parts = [[] for _ in b]
            for p, t in zip(parts, b):
                p.append(torch.as_tensor(t))
        return [torch.cat(p) for p in parts]
    raise TypeError(f"cannot fingerprint data of type {type(data).__name__}: pass tensors (x, y) or a Dataset")


def dataset_fingerprint(data: Any) -> dict:
    """``{"sha256": hex, "size": N, "shapes": [...]}`` of the training data.

    The hash covers the dtype, shape and bytes of every tensor, in order (so
    ``(x, y)`` and the same examples in another order differ)."""
    ts = _as_tensors(data)
    h = hashlib.sha256()
    for t in ts:
        _hash_tensor(h, t)
    return {"sha256": h.hexdigest(), "size": int(ts[0].shape[0]) if ts and ts[0].dim() else 0,
            "shapes": [list(t.shape[1:]) for t in ts]}


# --------------------------------------------------------------------------- save


def _registry():
    from .commentary import KINDS

    return KINDS


def save_commentary(path, commentary: nn.Module, *, data: Any = None, fingerprint: dict | None = None,
                    learned_with: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``commentary`` to ``path`` atomically; returns the path.

    ``data`` (the training data the commentary was learned on) or a ready
    ``fingerprint`` (from :func:`dataset_fingerprint`) is stored so that the
    file can be checked against the data it is later applied to.
    """
    from safetensors.torch import save as st_save

    from . import __version__

    path = Path(path)
    state = commentary.state_dict()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    if fingerprint is None and data is not None:
        fingerprint = dataset_fingerprint(data)
    meta = {
        "format": FORMAT,
        "kind": getattr(commentary, "kind", ""),
        "class": type(commentary).__name__,
        "config": commentary.config() if hasattr(commentary, "config") else {},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "num_classes": getattr(commentary, "num_classes", None),
        "num_examples": getattr(commentary, "num_examples", None),
        "input_shape": fingerprint["shapes"][0] if fingerprint and fingerprint.get("shapes") else None,
        "data": fingerprint,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "learned_with": learned_with or {},
        "extra": extra or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    blob = st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    _atomic_write(path, blob)
    return path


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# --------------------------------------------------------------------------- load


def read_metadata(path) -> dict:
    """The JSON metadata of a commentary file (nothing else is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no commentary file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error types
        raise CommentaryFileError(f"{path} is not a safetensors file: {e}") from e
    if raw is None:
        raise CommentaryFileError(f"{path} has no '{META_KEY}' metadata: not a commentary file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CommentaryFileError(f"{path}: corrupt metadata ({e})") from e
    if meta.get("format") != FORMAT:
        raise CommentaryFileError(f"{path}: unsupported format {meta.get('format')!r} (this library reads {FORMAT!r})")
    return meta


def _model_classes(model: nn.Module, input_shape) -> int | None:
    if input_shape is None:
        return None
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=dev, dtype=dtype))
    finally:
        model.train(was)
    return int(out.shape[-1]) if out.dim() == 2 else None


def load_commentary(path, *, commentary: nn.Module | None = None, data: Any = None, model: nn.Module | None = None,
                    num_classes: int | None = None, check_data: bool = True, map_location="cpu") -> nn.Module:
    """Load a commentary file, check it, and return the module.

    ``commentary``: a module to load into (needed for user networks; otherwise
    the module is rebuilt from the file's class and config).  ``data``: the
    training data it is applied to (fingerprint and size are checked unless
    ``check_data=False``, e.g. to reuse a commentary on new data on purpose).
    ``model``: the student it will train (its number of outputs must be the
    file's class count).  Raises :class:`CommentaryMismatchError` listing every
    mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    problems: list[str] = []
    cls_name = meta.get("class")
    registry = _registry()
    if commentary is None:
        cls = registry.get(cls_name)
        if cls is None:
            raise CommentaryFileError(f"{path}: unknown commentary class {cls_name!r} (known: {sorted(registry)}); "
                                      "pass commentary= to load into your own module")
        commentary = cls.from_config(meta.get("config", {}))
    else:
        if type(commentary).__name__ != cls_name:
            problems.append(f"class: file has {cls_name}, the given module is {type(commentary).__name__}")
        if getattr(commentary, "kind", "") != meta.get("kind"):
            problems.append(f"kind: file has {meta.get('kind')!r}, the given module is {getattr(commentary, 'kind', '')!r}")

    # tensors
    tensors = load_file(str(path), device=str(map_location))
    own = commentary.state_dict()
    for k in sorted(set(tensors) - set(own)):
        problems.append(f"tensor {k!r} is in the file but not in the module")
    for k in sorted(set(own) - set(tensors)):
        problems.append(f"tensor {k!r} of the module is missing from the file")
    for k in sorted(set(own) & set(tensors)):
        if tuple(own[k].shape) != tuple(tensors[k].shape):
            problems.append(f"tensor {k!r}: shape {list(tensors[k].shape)} in the file, {list(own[k].shape)} in the module")
        elif own[k].dtype != tensors[k].dtype and not (own[k].is_floating_point() and tensors[k].is_floating_point()):
            problems.append(f"tensor {k!r}: dtype {tensors[k].dtype} in the file, {own[k].dtype} in the module")
    for k, spec in meta.get("tensors", {}).items():
        if k in tensors and list(tensors[k].shape) != spec.get("shape"):
            problems.append(f"tensor {k!r}: metadata says shape {spec.get('shape')}, stored {list(tensors[k].shape)}")

    # class count
    C = meta.get("num_classes")
    if num_classes is not None and C is not None and int(num_classes) != int(C):
        problems.append(f"num_classes: file has {C}, expected {num_classes}")
    mod_c = getattr(commentary, "num_classes", None)
    if mod_c is not None and C is not None and int(mod_c) != int(C):
        problems.append(f"num_classes: file has {C}, the given module has {mod_c}")

    # data
    fp = meta.get("data")
    got = dataset_fingerprint(data) if data is not None else None
    if got is not None and check_data:
        if fp is None:
            problems.append("data: the file stores no data fingerprint (saved without data=); pass check_data=False")
        else:
            if got["size"] != fp.get("size"):
                problems.append(f"data size: file was learned on {fp.get('size')} examples, the data has {got['size']}")
            if got["shapes"] != fp.get("shapes"):
                problems.append(f"data shapes: file {fp.get('shapes')}, the data {got['shapes']}")
            if got["sha256"] != fp.get("sha256"):
                problems.append(f"data fingerprint: file sha256 {fp.get('sha256', '')[:16]}..., "
                                f"the data {got['sha256'][:16]}... (different examples, labels or order)")
    n_ex = meta.get("num_examples")
    if got is not None and n_ex is not None and got["size"] != n_ex and not (check_data and fp is not None):
        problems.append(f"num_examples: the tabular commentary has {n_ex} examples, the data has {got['size']}")

    # the student model
    if model is not None and C is not None:
        shape = meta.get("input_shape")
        if shape is None and got is not None and got["shapes"]:
            shape = got["shapes"][0]
        try:
            out_c = _model_classes(model, shape)
        except Exception as e:  # noqa: BLE001
            problems.append(f"model: could not run the model on an input of shape {shape}: {e}")
            out_c = None
        if out_c is not None and out_c != int(C):
            problems.append(f"model: it outputs {out_c} classes, the commentary was learned with {C}")

    if problems:
        raise CommentaryMismatchError(path, problems)
    with torch.no_grad():
        commentary.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
    commentary.file_metadata = meta
    return commentary
