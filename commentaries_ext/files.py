"""Commentary files: save a learned commentary with its dataset and reuse it.

A commentary file is one ``safetensors`` file: the commentary's tensors (its
``state_dict``) plus JSON metadata under the key ``"commentaries_ext"``:

    format, kind, class, config (constructor arguments), tensors (shape and
    dtype of each), num_classes, num_examples, input_shape, data (fingerprint
    and size of the training data), library and torch versions, learned_with
    (how it was learned: algorithm, steps, learning rates ...), created,
    content_sha256 (of the tensors and the metadata from format to data: a
    changed byte there is refused at load; learned_with, extra, created and the
    versions may be edited; files written before it existed have none).

Loading never executes code from the file (no pickle): the module is rebuilt
from a fixed registry of classes and its JSON constructor arguments, or the
caller passes the module to load into.  The metadata is checked against the
data, student model and module it is applied to, and every mismatch is listed
in one :class:`CommentaryMismatchError`.  A hand-edited or hostile file is refused
(:class:`CommentaryFileError`) before any tensor or module is allocated: the
safetensors header is parsed here (length, JSON, duplicate keys, dtypes, shapes,
offsets tiling the data section, limits ``MAX_*``), the metadata must have only
known keys of the right types, the config only constructor arguments with
scalar values, and the module is first built on the ``meta`` device so that its
shapes are compared with the header's; tensors holding NaN or Inf are refused.
Writes are atomic: the file is written
to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash mid-write leaves the old file intact.

    save_commentary("digits.commentary", commentary, data=(x_train, y_train),
                    learned_with={"algorithm": "ift", "steps": 1000})
    c = load_commentary("digits.commentary", data=(x_train, y_train), model=student)
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ._atomic import write_atomic

FORMAT = "commentaries_ext.commentary/1"
META_KEY = "commentaries_ext"

# Limits checked on the file's header before anything is allocated (a hand-edited or
# malicious file must not make the loader allocate or run for long).
MAX_FILE_BYTES = 8 << 30  # the whole file
MAX_HEADER_BYTES = 16 << 20  # the safetensors JSON header (metadata included)
MAX_TENSORS = 10_000
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 30  # elements of all tensors together
MAX_INPUT_ELEMENTS = 1 << 24  # the input the student model is probed with (input_shape)
MAX_JSON_DEPTH = 32

# safetensors dtype names this loader accepts (what commentary state_dicts hold)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
# the JSON metadata of a commentary file (what save_commentary writes); other keys are refused
META_KEYS = frozenset({"format", "kind", "class", "config", "tensors", "num_classes", "num_examples", "input_shape",
                       "data", "library_version", "torch_version", "learned_with", "extra", "created",
                       "content_sha256"})


class CommentaryFileError(ValueError):
    """Not a (readable) commentary file."""


class CommentaryMismatchError(ValueError):
    """The file does not match the data / model / module it is applied to.

    ``problems`` lists every mismatch found."""

    def __init__(self, path, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"commentary file {path} does not match:\n  - " + "\n  - ".join(self.problems))


# --------------------------------------------------------------------------- fingerprints


# the metadata that says what the commentary is (and the tensors): covered by content_sha256;
# the rest (learned_with, extra, created, versions) is information a user may edit or drop
_HASHED_META = ("format", "kind", "class", "config", "tensors", "num_classes", "num_examples", "input_shape", "data")


def _content_sha256(meta: dict, tensors: dict) -> str:
    """sha256 of what a commentary file holds (``_HASHED_META`` and the tensors): a flipped bit
    in a value or a config number is refused at load instead of changing the commentary."""
    h = hashlib.sha256(json.dumps({k: meta.get(k) for k in _HASHED_META}, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode() + b"|")
        _hash_tensor(h, tensors[k])
    return h.hexdigest()


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        t = t.reshape(-1)  # (a 0-dim tensor has no byte view)
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
    for k, v in tensors.items():  # load_commentary refuses them: say so now, not when reusing the file
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise ValueError(f"save_commentary: tensor {k!r} of the commentary holds NaN or Inf; not saved")
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
    meta = json.loads(json.dumps(meta))  # as load_commentary will read it back (tuples as lists, ...)
    meta["content_sha256"] = _content_sha256(meta, tensors)
    blob = st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    _atomic_write(path, blob)
    return path


def _atomic_write(path: Path, blob: bytes) -> None:
    write_atomic(path, lambda f: f.write(blob))


# --------------------------------------------------------------------------- load


def _refuse(path, msg: str):
    return CommentaryFileError(f"{path}: {msg}")


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _json_depth(x, limit: int, depth: int = 0) -> None:
    if depth > limit:
        raise ValueError(f"nested deeper than {limit} levels")
    if isinstance(x, dict):
        for v in x.values():
            _json_depth(v, limit, depth + 1)
    elif isinstance(x, list):
        for v in x:
            _json_depth(v, limit, depth + 1)


def _loads(path, raw: str | bytes, what: str):
    """``json.loads`` that refuses duplicate keys, NaN/Infinity, deep nesting and huge numbers."""
    def bad_constant(c):
        raise ValueError(f"non-finite number {c}")

    try:
        out = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=bad_constant)
        _json_depth(out, MAX_JSON_DEPTH)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _refuse(path, f"corrupt {what} ({type(e).__name__}: {e})") from None
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_header(path) -> tuple[dict, dict, int]:
    """The safetensors header of ``path``, validated without reading any tensor data.

    Returns ``(tensors, metadata, data_start)``: ``tensors[name] = (torch dtype, shape,
    (begin, end))`` with every size, dtype and offset checked (offsets tile the data
    section exactly, sizes match shape x dtype, limits ``MAX_*``), ``metadata`` the
    string-to-string ``__metadata__`` map."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no commentary file at {path}")
    if not path.is_file():
        raise _refuse(path, "not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _refuse(path, f"file of {size} bytes is larger than the limit files.MAX_FILE_BYTES={MAX_FILE_BYTES}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _refuse(path, f"not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _refuse(path, f"not a safetensors file (header length {n} for a file of {size} bytes, "
                                f"limit {MAX_HEADER_BYTES})")
        raw = f.read(n)
    if len(raw) != n:
        raise _refuse(path, "truncated header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(path, "not a safetensors file (header is not UTF-8 JSON)") from None
    header = _loads(path, text, "safetensors header")
    if not isinstance(header, dict):
        raise _refuse(path, f"not a safetensors file (header is a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _refuse(path, "safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _refuse(path, f"{len(header)} tensors (limit files.MAX_TENSORS={MAX_TENSORS})")
    data_len = size - 8 - n
    tensors: dict[str, tuple] = {}
    total = 0
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _refuse(path, f"tensor {name!r}: header entry must have exactly dtype, shape and data_offsets")
        dt, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise _refuse(path, f"tensor {name!r}: unsupported dtype {dt!r} (accepted: {sorted(_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise _refuse(path, f"tensor {name!r}: shape {shape!r} must be a list of at most {MAX_NDIM} "
                                "non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise _refuse(path, f"tensor {name!r}: data_offsets {offs!r} must be two integers")
        numel = 1
        for d in shape:
            numel *= d
        total += numel
        if total > MAX_ELEMENTS:
            raise _refuse(path, f"tensor {name!r}: the tensors hold more than files.MAX_ELEMENTS={MAX_ELEMENTS} "
                                "elements")
        b, e = offs
        dtype, itemsize = _DTYPES[dt]
        if not (0 <= b <= e <= data_len) or e - b != numel * itemsize:
            raise _refuse(path, f"tensor {name!r}: data_offsets {offs} do not hold shape {shape} of {dt} "
                                f"({numel * itemsize} bytes) inside the {data_len}-byte data section")
        tensors[name] = (dtype, tuple(shape), (b, e))
    pos = 0
    for name, (_, _, (b, e)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if b != pos:
            raise _refuse(path, f"tensor {name!r}: data_offsets overlap or leave a gap (starts at {b}, "
                                f"expected {pos})")
        pos = e
    if pos != data_len:
        raise _refuse(path, f"{data_len - pos} bytes after the last tensor (truncated or appended data)")
    return tensors, metadata, 8 + n


def _check_meta(path, meta) -> dict:
    """Structure and types of the JSON metadata (every field is optional)."""
    if not isinstance(meta, dict):
        raise _refuse(path, f"corrupt metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT:
        raise _refuse(path, f"unsupported format {meta.get('format')!r} (this library reads {FORMAT!r})")
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise _refuse(path, f"unknown metadata keys {unknown} (not written by this library)")

    def bad(key, want):
        return _refuse(path, f"metadata {key!r} must be {want}, got {meta[key]!r:.200}")

    for key in ("kind", "class", "library_version", "torch_version", "created"):
        if key in meta and not isinstance(meta[key], str):
            raise bad(key, "a string")
    for key in ("config", "learned_with", "extra"):
        if key in meta and not (isinstance(meta[key], dict) or (key != "config" and meta[key] is None)):
            raise bad(key, "an object")
    for key in ("num_classes", "num_examples"):
        if meta.get(key) is not None and not (_is_int(meta[key]) and 1 <= meta[key] <= 1 << 40):
            raise bad(key, "a positive integer or null")
    shape = meta.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad("input_shape", f"a list of at most {MAX_NDIM} non-negative integers or null")
        numel = 1
        for d in shape:
            numel *= d
        if numel > MAX_INPUT_ELEMENTS:
            raise bad("input_shape", f"an example of at most files.MAX_INPUT_ELEMENTS={MAX_INPUT_ELEMENTS} elements")
    if "tensors" in meta:
        ts = meta["tensors"]
        if not isinstance(ts, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
                and all(_is_int(d) and d >= 0 for d in v["shape"]) for v in ts.values()):
            raise bad("tensors", "an object of {shape: [int, ...], dtype: str}")
    fp = meta.get("data")
    if fp is not None:
        if (not isinstance(fp, dict) or not isinstance(fp.get("sha256"), str) or not _is_int(fp.get("size"))
                or not isinstance(fp.get("shapes"), list)
                or not all(isinstance(s, list) and all(_is_int(d) for d in s) for s in fp["shapes"])):
            raise bad("data", "a fingerprint {sha256: str, size: int, shapes: [[int, ...], ...]} or null")
    return meta


def read_metadata(path) -> dict:
    """The JSON metadata of a commentary file (only the header is read, and validated)."""
    path = Path(path)
    _, metadata, _ = _read_header(path)
    raw = metadata.get(META_KEY)
    if raw is None:
        raise CommentaryFileError(f"{path} has no '{META_KEY}' metadata: not a commentary file")
    unknown = sorted(set(metadata) - {META_KEY})
    if unknown:
        raise _refuse(path, f"unknown safetensors metadata keys {unknown} (not written by this library)")
    return _check_meta(path, _loads(path, raw, "metadata"))


def _config_keys(cls) -> set:
    """Constructor arguments a commentary class accepts in a file's ``config``."""
    keys: set = set()
    for fn in (cls.__init__, getattr(cls, "reference", None)):
        if fn is None:
            continue
        for name, prm in inspect.signature(fn).parameters.items():
            if prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY) and name not in ("self", "cls", "_config"):
                keys.add(name)
    return keys


def _check_config(path, cls, cfg) -> dict:
    if not isinstance(cfg, dict):
        raise _refuse(path, f"config must be an object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _config_keys(cls))
    if unknown:
        raise _refuse(path, f"config has unknown keys {unknown} for {cls.__name__}")

    def scalar(v):
        if v is None or isinstance(v, bool) or _is_int(v):
            return not _is_int(v) or abs(v) <= 1 << 62
        if isinstance(v, float):
            return math.isfinite(v)
        return isinstance(v, str) and len(v) <= 256

    for k, v in cfg.items():
        ok = scalar(v) or (isinstance(v, list) and len(v) <= MAX_NDIM and all(scalar(e) for e in v))
        if not ok:
            raise _refuse(path, f"config {k!r}: {v!r:.200} is not a number, string, bool, null or short list")
    return cfg


def _build(path, cls, cfg: dict, *, meta_device: bool) -> nn.Module:
    """``cls.from_config(cfg)``, on the meta device (no memory) when ``meta_device``."""
    try:
        if meta_device:
            with torch.device("meta"):
                return cls.from_config(cfg)
        return cls.from_config(cfg)
    except (TypeError, ValueError, KeyError, OverflowError, RuntimeError, IndexError) as e:
        raise _refuse(path, f"cannot build {cls.__name__} from the file's config {cfg!r:.300}: "
                            f"{type(e).__name__}: {e}") from None


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
    ``check_data=False``, e.g. to reuse a commentary on new data on purpose;
    a commentary whose own network needs one input shape -- the reference
    weighting teacher, the mask U-Net's channels -- is refused for data of
    another shape either way).  ``model``: the student it will train (its
    number of outputs must be the file's class count; it is run on an example
    of ``data``'s shape, or of the file's data without ``data``).  Raises
    :class:`CommentaryMismatchError` listing every mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    header, _, _ = _read_header(path)  # sizes, dtypes, offsets: validated before anything is allocated
    meta = read_metadata(path)
    problems: list[str] = []
    cls_name = meta.get("class")
    registry = _registry()
    built = commentary is None
    if commentary is None:
        cls = registry.get(cls_name)
        if cls is None:
            raise CommentaryFileError(f"{path}: unknown commentary class {cls_name!r} (known: {sorted(registry)}); "
                                      "pass commentary= to load into your own module")
        cfg = _check_config(path, cls, meta.get("config", {}))
        # first on the meta device: the shapes the config implies, with no memory allocated
        commentary = _build(path, cls, cfg, meta_device=True)
    else:
        if type(commentary).__name__ != cls_name:
            problems.append(f"class: file has {cls_name}, the given module is {type(commentary).__name__}")
        if getattr(commentary, "kind", "") != meta.get("kind"):
            problems.append(f"kind: file has {meta.get('kind')!r}, the given module is {getattr(commentary, 'kind', '')!r}")
        # the file's configuration against the given module's (reduction, alpha, sigma ...): the
        # tensors load either way, but the commentary would act otherwise than when it was learned
        file_cfg = dict(meta.get("config") or {})
        if meta.get("kind") == "example_weighting":
            from .commentary.weighting import _FILE_REDUCTION

            file_cfg.setdefault("reduction", _FILE_REDUCTION)  # files written before the key: "sum"
        try:
            own_cfg = json.loads(json.dumps(commentary.config()))  # tuples as the file's lists
        except (AttributeError, TypeError, ValueError):  # a module without a JSON config
            own_cfg = {}
        for k in sorted(set(file_cfg) & set(own_cfg)):
            if file_cfg[k] != own_cfg[k]:
                problems.append(f"config {k}: file has {file_cfg[k]!r}, the given module has {own_cfg[k]!r}")

    # tensors: the header against the metadata and the module, before loading any
    specs = meta.get("tensors")
    if specs is not None:
        for k in sorted(set(specs) ^ set(header)):
            where = "metadata" if k in specs else "data"
            raise _refuse(path, f"tensor {k!r} is listed in the {where} only (the file was edited or is corrupt)")
        for k, spec in specs.items():
            dt, shape, _ = header[k]
            if list(shape) != spec["shape"] or str(dt).replace("torch.", "") != spec["dtype"]:
                raise _refuse(path, f"tensor {k!r}: metadata says {spec['dtype']} {spec['shape']}, stored "
                                    f"{str(dt).replace('torch.', '')} {list(shape)} (the file was edited or is corrupt)")
    own = commentary.state_dict()
    for k in sorted(set(header) - set(own)):
        problems.append(f"tensor {k!r} is in the file but not in the module")
    for k in sorted(set(own) - set(header)):
        problems.append(f"tensor {k!r} of the module is missing from the file")
    for k in sorted(set(own) & set(header)):
        dt, shape, _ = header[k]
        if tuple(own[k].shape) != shape:
            problems.append(f"tensor {k!r}: shape {list(shape)} in the file, {list(own[k].shape)} in the module")
        elif own[k].dtype != dt and not (own[k].is_floating_point() and dt.is_floating_point):
            problems.append(f"tensor {k!r}: dtype {dt} in the file, {own[k].dtype} in the module")

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

    # the commentary's own network and the student model, on examples of the data when given (the
    # data may be other data on purpose: check_data=False), else of the data the file was learned on
    shape = got["shapes"][0] if got is not None and got["shapes"] else meta.get("input_shape")
    why = commentary.input_mismatch(shape) if got is not None and hasattr(commentary, "input_mismatch") else None
    if why is not None:
        problems.append(f"input shape: {why}; the data has examples of shape {list(shape)}, so this "
                        f"{type(commentary).__name__} cannot be applied to it")
    if model is not None and C is not None:
        try:
            out_c = _model_classes(model, shape)
        except Exception as e:  # noqa: BLE001
            problems.append(f"model: could not run the model on an input of shape {shape}: {e}")
            out_c = None
        if out_c is not None and out_c != int(C):
            problems.append(f"model: it outputs {out_c} classes, the commentary was learned with {C}")

    if problems:
        raise CommentaryMismatchError(path, problems)
    if built:  # the header matches the module the config describes: now allocate it
        commentary = _build(path, cls, cfg, meta_device=False)
        floats = {h[0] for h in header.values() if h[0].is_floating_point}
        if len(floats) == 1:  # in the file's precision (a float64 commentary comes back float64)
            commentary = commentary.to(floats.pop())
        own = commentary.state_dict()
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise _refuse(path, f"cannot read the tensors: {e}") from e
    for k, t in tensors.items():  # what safetensors read is what the header check saw
        if k not in header or (t.dtype, tuple(t.shape)) != header[k][:2]:
            raise _refuse(path, f"tensor {k!r} read back differently from its header")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise _refuse(path, f"tensor {k!r} holds NaN or Inf")
    if set(tensors) != set(header):
        raise _refuse(path, "the tensors read back differ from the header")
    want = meta.get("content_sha256")  # (files written before it existed have none)
    if want is not None and _content_sha256(meta, tensors) != want:
        raise _refuse(path, "corrupted: the metadata and tensors do not match the file's content_sha256 "
                            "(a changed byte: edited, or damaged in a copy)")
    with torch.no_grad():
        commentary.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
    commentary.file_metadata = meta
    return commentary
