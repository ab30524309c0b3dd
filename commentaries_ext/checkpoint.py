"""Checkpoint and resume for the learning and training loops.

A *checkpoint* here is the full state of a running job (``learn_bptt``,
``learn_ift``, ``train_student``, the CLI's ``learn``/``train``): student,
commentary, every optimizer (and LR scheduler, if any), the RNG states (the
loop's own ``torch.Generator`` plus the global torch, numpy, Python and CUDA
generators), the step counter, the result history and skipped counts, and the
engine's power-iteration state (``lambda_max``, its eigenvector and when it was
estimated), so that a resumed run continues bit-for-bit like an uninterrupted
one.  (Not to be confused with ``learn_bptt(checkpoint=N)``: *activation*
checkpointing of the differentiable unroll, which trades compute for memory.)

File format (one file, written atomically)::

    magic  b"CMTXCKPT"            8 bytes
    format version (uint32 LE)    4 bytes
    payload length (uint64 LE)    8 bytes
    sha256 of the payload        32 bytes
    payload                       torch.save of a dict of tensors/containers/numbers/strings

Writing (one writer at a time: ``.<name>.lock``) goes to ``.<name>.tmp`` in the same
directory (flushed and fsynced),
the current file, if it verifies, is rotated to ``<path>.prev``, the temporary
replaces ``<path>`` (``os.replace``) and the directory is fsynced.  A crash at
any point leaves a good checkpoint in ``<path>`` or ``<path>.prev`` (and, between the
two renames, the complete new one in the temporary file, which loading then uses).  Reading
checks magic, version, length and hash before ``torch.load(weights_only=True)``
of the verified payload (no code from the file runs); a bad file is refused
with :class:`CheckpointError` naming the file and the problem, and
:func:`load_checkpoint` then falls back to ``<path>.prev`` with a
:class:`CheckpointWarning`.

In the loops: ``checkpoint_path=``, ``checkpoint_every=`` and ``resume=``
(:class:`Checkpointer`).  A checkpoint stores the run's configuration
(hyper-parameters, seed, data fingerprints, parameter shapes); resuming with a
different one is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ._atomic import check_writable, write_atomic

MAGIC = b"CMTXCKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
HEADER_SIZE = _HEADER.size  # 52
PREV_SUFFIX = ".prev"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (corrupt, truncated, another format or
    another run configuration).  ``path`` and ``problem`` say which and why."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"checkpoint {path}: {problem}")


class CheckpointWarning(UserWarning):
    """A bad newest checkpoint was refused and the previous good one is used."""


def previous_path(path) -> Path:
    """Where the previous good checkpoint of ``path`` is kept (``<path>.prev``)."""
    path = Path(path)
    return path.with_name(path.name + PREV_SUFFIX)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


# --------------------------------------------------------------------------- raw file format


def _write_all(f, data: bytes) -> None:
    """Write ``data`` to ``f`` (a separate function so tests can simulate a crash mid-write)."""
    view = memoryview(data)
    step = 1 << 22
    for i in range(0, len(view), step):
        f.write(view[i:i + step])


def _verify(path: Path) -> bytes:
    """The verified payload of checkpoint ``path`` (raises :class:`CheckpointError`)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e})") from e
    if len(blob) < HEADER_SIZE:
        raise CheckpointError(path, f"truncated: {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError(path, f"not a commentaries_ext checkpoint (magic {magic!r}, expected {MAGIC!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"format version {version} is newer than this library's ({FORMAT_VERSION})")
    if version < FORMAT_VERSION:
        raise CheckpointError(path, f"format version {version} is older than this library's ({FORMAT_VERSION}), "
                                    "which cannot read it")
    have = len(blob) - HEADER_SIZE
    if have < length:
        raise CheckpointError(path, f"truncated: the payload has {have} of {length} bytes "
                                    "(an interrupted write or a partial copy)")
    if have > length:
        raise CheckpointError(path, f"{have - length} unexpected trailing bytes after the {length}-byte payload")
    payload = blob[HEADER_SIZE:]
    got = hashlib.sha256(payload).digest()
    if got != digest:
        raise CheckpointError(path, f"corrupted: payload sha256 {got.hex()[:16]}... does not match the "
                                    f"header's {digest.hex()[:16]}...")
    return payload


def verify_checkpoint(path) -> None:
    """Raise :class:`CheckpointError` (or ``FileNotFoundError``) unless ``path`` is intact."""
    _verify(Path(path))


def save_checkpoint(path, state: Mapping[str, Any], *, keep_previous: bool = True) -> Path:
    """Write ``state`` (tensors, containers, numbers, strings) to ``path`` atomically.

    With ``keep_previous`` the current ``path``, if intact, becomes ``<path>.prev``
    (a corrupt one is overwritten and the older ``.prev`` kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getvalue()
    try:  # refuse now what could not be resumed from later
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, f"state not saved: it holds objects torch.load(weights_only=True) refuses "
                                    f"({_short(e)}); store tensors, containers, numbers and strings") from e
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())

    def write(f):
        _write_all(f, header)
        _write_all(f, payload)

    def keep_old():
        if keep_previous and path.exists():
            try:
                _verify(path)
            except CheckpointError as e:
                warnings.warn(f"{e}; not kept as the previous checkpoint (keeping {previous_path(path)})",
                              CheckpointWarning, stacklevel=3)
            else:
                os.replace(path, previous_path(path))

    with _writer_lock(path):
        return write_atomic(path, write, tmp=_temp_path(path), before_replace=keep_old)


@contextlib.contextmanager
def _writer_lock(path: Path):
    """One writer at a time for ``path`` (an exclusive ``flock`` on ``.<name>.lock`` beside it,
    released when the write ends or its process dies): two jobs given the same checkpoint path
    truncated and renamed each other's temporary file, and one crashed. Without ``fcntl``
    (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _short(e: Exception) -> str:
    msg = str(e)
    i = msg.find("WeightsUnpickler error:")
    if i >= 0:
        msg = msg[i:]
    # the first line with more than the "WeightsUnpickler error:" prefix (the reason may follow it)
    lines = [ln.strip() for ln in msg.split("\n") if ln.strip() and ln.strip() != "WeightsUnpickler error:"]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def read_checkpoint(path) -> dict:
    """The state in checkpoint ``path``, verified (strict: no fallback).

    Raises ``FileNotFoundError`` or :class:`CheckpointError`."""
    path = Path(path)
    payload = _verify(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a refusal
        raise CheckpointError(path, f"payload refused by torch.load(weights_only=True): {_short(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(path, f"payload is a {type(state).__name__}, expected a dict")
    return state


def load_checkpoint(path, *, fallback: bool = True) -> tuple[dict, Path]:
    """``(state, file used)``: ``path`` if intact, else (``fallback``) ``<path>.prev``
    with a :class:`CheckpointWarning` naming what was wrong with ``path``. When ``path``
    is missing and the temporary file of an interrupted write is complete (it verifies),
    that newer version is used instead of ``.prev``.

    Raises ``FileNotFoundError`` when neither exists and :class:`CheckpointError`
    when none is usable."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return read_checkpoint(path), path
    except FileNotFoundError:
        # A write interrupted between its two renames (the current file moved to .prev, the new
        # one not yet renamed into place) leaves the new version complete in the temporary file:
        # newer than .prev, and used if it verifies.
        tmp = _temp_path(path)
        if fallback and tmp.exists():
            try:
                state = read_checkpoint(tmp)
            except (CheckpointError, FileNotFoundError):
                pass
            else:
                warnings.warn(f"checkpoint {path} is missing (a write interrupted before its last rename); "
                              f"using the complete new version left in {tmp}", CheckpointWarning, stacklevel=2)
                return state, tmp
        if not fallback or not prev.exists():
            raise FileNotFoundError(f"no checkpoint at {path}") from None
        warnings.warn(f"checkpoint {path} is missing (interrupted while being replaced?); "
                      f"using the previous one, {prev}", CheckpointWarning, stacklevel=2)
        return read_checkpoint(prev), prev
    except CheckpointError as e:
        if not fallback:
            raise
        if not prev.exists():
            raise CheckpointError(path, f"{e.problem}; and there is no previous checkpoint {prev}") from e
        try:
            state = read_checkpoint(prev)
        except CheckpointError as e2:
            raise CheckpointError(path, f"{e.problem}; and the previous checkpoint is unusable too "
                                        f"({e2})") from e2
        warnings.warn(f"{e}; refused, using the previous good checkpoint {prev}", CheckpointWarning, stacklevel=2)
        return state, prev


# --------------------------------------------------------------------------- RNG states


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The global torch / CUDA / numpy / Python RNG states and those of ``generators``."""
    st: dict = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    st["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    st["solver_choices"] = _solver_choices()
    st["conv_choices"] = _conv_choices()
    return st


def set_rng_state(st: Mapping, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(st["torch"])
    random.setstate(_py_unstate(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        if len(st["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(st["cuda"])
        else:
            warnings.warn(f"the checkpoint has CUDA RNG states for {len(st['cuda'])} devices, this machine "
                          f"{torch.cuda.device_count()}: not restored", CheckpointWarning, stacklevel=2)
    if "numpy" in st:
        import numpy as np

        s = st["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    _set_solver_choices(st.get("solver_choices", []))
    _set_conv_choices(st.get("conv_choices", []))
    saved = st.get("generators", {})
    for k, g in (generators or {}).items():
        if k not in saved:
            raise KeyError(f"the checkpoint has no state for generator {k!r}")
        g.set_state(saved[k])


def _solver_choices() -> list:
    """The engine's timed choices between fused solver kernels and the foreach path
    (they change the summation order, so a resumed run must make the same ones)."""
    from .engine import vector

    return [{"name": k[0], "dtype": str(k[1]), "shapes": [list(s) for s in k[2]], "fused": bool(v)}
            for k, v in vector._choice.items()]


def _conv_choices() -> list:
    """The engine's timed choices between matmul + col2im and ``convolution_backward`` for
    convolution input gradients (they change the rounding: a resumed run makes the same ones)."""
    from .engine import conv

    return [{"grad_out": list(k[0]), "input": list(k[1]), "weight": list(k[2]), "dtype": str(k[3]),
             "stride": list(k[4]), "padding": list(k[5]), "dilation": list(k[6]), "fold": bool(v)}
            for k, v in conv._FOLD_FASTER.items()]


def _set_conv_choices(choices) -> None:
    from .engine import conv

    for c in choices:
        key = (tuple(c["grad_out"]), tuple(c["input"]), tuple(c["weight"]),
               getattr(torch, c["dtype"].replace("torch.", "")), tuple(c["stride"]), tuple(c["padding"]),
               tuple(c["dilation"]))
        conv._FOLD_FASTER[key] = bool(c["fold"])


def _set_solver_choices(choices) -> None:
    from .engine import vector

    for c in choices:
        dtype = getattr(torch, c["dtype"].replace("torch.", ""))
        vector._choice[(c["name"], dtype, tuple(tuple(s) for s in c["shapes"]))] = bool(c["fused"])


def _py_state(s):
    version, internal, gauss = s
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_unstate(s):
    return (s["version"], tuple(int(v) for v in s["internal"].tolist()), s["gauss"])


# --------------------------------------------------------------------------- run configuration


def plain(v):
    """``v`` as something a checkpoint can store and compare (numbers, strings, lists, dicts)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [plain(u) for u in v]
    if isinstance(v, Mapping):
        return {str(k): plain(u) for k, u in v.items()}
    if isinstance(v, torch.Size):
        return list(v)
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    return repr(v)


def shapes(module: torch.nn.Module | None) -> dict | None:
    """``{name: shape}`` of a module's parameters and buffers (for the run configuration)."""
    if module is None:
        return None
    return {k: list(v.shape) for k, v in module.state_dict().items() if torch.is_tensor(v)}


def optimizer_config(opt) -> Any:
    """Type and hyper-parameters (not the parameters) of a ``torch.optim`` optimizer."""
    if opt is None:
        return None
    groups = [{k: plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"type": type(opt).__name__, "groups": groups, "sizes": [len(g["params"]) for g in opt.param_groups]}


def data_fingerprint(data) -> dict:
    from .files import dataset_fingerprint

    return dataset_fingerprint((data[0], data[1]))


def _optimizer_defaults(type_name: str) -> dict:
    """The default settings of ``torch.optim.<type_name>`` (empty for another optimizer), from an
    instance: a subclass may fix a setting its constructor does not take (AdamW's
    decoupled_weight_decay=True)."""
    cls = getattr(torch.optim, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return {}
    try:
        return {k: plain(v) for k, v in cls([torch.zeros(1, requires_grad=True)]).defaults.items()}
    except Exception:  # an optimizer that needs more than parameters (e.g. a required lr)
        return {}


def _with_defaults(config):
    """``config`` with every torch optimizer group's missing settings at their constructor
    defaults, for the comparison: a setting that a later torch adds (at its default) does not
    refuse a checkpoint written before it existed."""
    if isinstance(config, dict):
        if isinstance(config.get("type"), str) and isinstance(config.get("groups"), list):
            defaults = {k: v for k, v in _optimizer_defaults(config["type"]).items() if k != "params"}
            groups = [{**defaults, **g} if isinstance(g, dict) else g for g in config["groups"]]
            return {**config, "groups": groups}
        return {k: _with_defaults(v) for k, v in config.items()}
    return config


def _differences(stored, now, prefix=""):
    out = []
    if isinstance(stored, dict) and isinstance(now, dict):
        for k in sorted(set(stored) | set(now)):
            name = f"{prefix}.{k}" if prefix else k
            if k not in stored:
                out.append(f"{name}: not in the checkpoint, now {now[k]!r}")
            elif k not in now:
                out.append(f"{name}: {stored[k]!r} in the checkpoint, not set now")
            else:
                out += _differences(stored[k], now[k], name)
        return out
    # lists of containers (optimizer groups) entry by entry; lists of numbers (shapes, betas) whole
    if (isinstance(stored, (list, tuple)) and isinstance(now, (list, tuple)) and len(stored) == len(now)
            and any(isinstance(v, (dict, list, tuple)) for v in (*stored, *now))):
        for i, (s, n) in enumerate(zip(stored, now)):
            out += _differences(s, n, f"{prefix}[{i}]")
        return out
    if stored != now and not (isinstance(stored, float) and isinstance(now, float) and stored != stored and now != now):
        s, n = repr(stored), repr(now)
        out.append(f"{prefix}: checkpoint {s[:120]}, now {n[:120]}")
    return out


def refuse_changes(path, stored, now) -> None:
    """``CheckpointError`` listing every difference between a checkpoint's run configuration (or a
    part of it checked later, such as fresh students' shapes) and the present one."""
    diffs = _differences(stored, now)
    if diffs:
        raise CheckpointError(path, "written by a run with another configuration:\n  - " + "\n  - ".join(diffs)
                              + "\npass resume=False (CLI: --no-resume) to start afresh and overwrite it, "
                                "or use another checkpoint path")


# --------------------------------------------------------------------------- the loops' helper


def default_every(kind: str) -> int:
    """Default ``checkpoint_every``: every outer step for BPTT, every 50 steps otherwise."""
    return 1 if kind == "learn_bptt" else 50


class Checkpointer:
    """Periodic checkpoints of one job.

    ``kind`` names the loop (``"learn_bptt"``, ...), ``config`` the run
    configuration (see :func:`plain`); ``every`` in the loop's steps (outer steps
    for BPTT); ``total`` the number of steps (the final state is always saved).
    ``upgrade(state)``: brings a checkpoint written by an older version to the present
    layout (its ``config`` and state) before the comparison, so that it still resumes.
    """

    def __init__(self, path, kind: str, config: Mapping, *, every: int | None = None, total: int | None = None,
                 resume: bool = True, upgrade: Callable[[dict], None] | None = None, group=None):
        every = default_every(kind) if every is None else int(every)
        if every <= 0:
            raise ValueError(f"checkpoint_every must be a positive number of steps, got {every}")
        self.path, self.kind, self.every, self.total = Path(path), kind, every, total
        self.group = group  # the run's process group: its rank 0 writes
        if _is_writer(group):
            try:  # now, not at the first save after steps of work
                check_writable(self.path)
            except OSError as e:
                raise CheckpointError(self.path, f"cannot be written ({e.strerror or e})") from e
        self.config = plain(dict(config))
        self.resume = bool(resume)
        self.upgrade = upgrade
        self.saves = 0
        self.loaded_from: Path | None = None

    def load(self) -> dict | None:
        """The state to resume from, or None (no checkpoint, or ``resume=False``)."""
        if not self.resume:
            return None
        try:
            state, used = load_checkpoint(self.path)
        except FileNotFoundError:
            return None
        if state.get("kind") != self.kind:
            raise CheckpointError(used, f"written by {state.get('kind')!r}, not {self.kind!r}")
        if self.upgrade is not None and isinstance(state.get("config"), dict):
            self.upgrade(state)
        refuse_changes(used, _with_defaults(state.get("config")), _with_defaults(self.config))
        self.loaded_from = used
        return state

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` completed steps."""
        return step % self.every == 0 or (self.total is not None and step >= self.total)

    def save(self, step: int, state: Mapping) -> Path:
        full = {"kind": self.kind, "config": self.config, "step": int(step), "created": time.time(),
                "library_version": _version(), "torch_version": str(torch.__version__), **state}
        out = save_checkpoint(self.path, full)
        self.saves += 1
        return out

    def step_done(self, step: int, make_state: Callable[[], Mapping]) -> bool:
        """Called after each completed step; saves (``make_state()``) when due."""
        if not self.due(step) or not _is_writer(self.group):
            return False
        self.save(step, make_state())
        return True


def _version() -> str:
    from . import __version__

    return __version__


def _is_writer(group=None) -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0


def make_checkpointer(path, kind: str, config: Mapping | Callable[[], Mapping], *, every=None, total=None,
                      resume=True, upgrade=None, group=None):
    """A :class:`Checkpointer`, or None when ``path`` is None (``config`` may be a
    callable: it is then only evaluated -- data fingerprints hashed -- when checkpointing)."""
    if path is None:
        return None
    return Checkpointer(path, kind, config() if callable(config) else config, every=every, total=total,
                        resume=resume, upgrade=upgrade, group=group)
