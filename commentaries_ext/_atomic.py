"""Atomic replacement of a file, shared by commentary files and checkpoints.

A new version is written to a temporary file in the same folder, flushed and
fsynced, then renamed over the old one (``os.replace``, atomic on POSIX) and the
folder is fsynced so that the rename survives a power loss. A crash at any point
leaves either the old file or the new one, never a mix; on an error the
temporary file is removed.
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def check_writable(path: Path) -> None:
    """Raise ``OSError`` naming ``path`` now if a file cannot be written there (its folder is
    created), before work whose result would then be lost."""
    path = Path(path)
    if path.is_dir():  # (os.replace onto it fails only at the end)
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A fresh ``.<name>.*.tmp`` beside ``path``, opened for writing, with the mode the new file
    should have: the replaced file's, else what a plain ``open()`` gives (0666 less the umask,
    applied by the kernel). ``mkstemp`` would make every file readable by its owner only."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    for _ in range(tempfile.TMP_MAX):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            try:  # the umask may have removed bits the old file had
                os.fchmod(fd, mode)
            except OSError:  # a file system without modes: its default
                pass
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


STALE_SECONDS = 3600


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a process killed while writing it (an error removes its
    own): those untouched for an hour; a writer busy now touches its file as it writes."""
    now = time.time()
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - old.stat().st_mtime > STALE_SECONDS:
                old.unlink()
        except OSError:  # gone meanwhile, or not ours to remove
            pass


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, tmp: Path | None = None,
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Replace ``path`` by what ``write(f)`` writes. ``tmp``: the temporary file (default: a
    fresh ``.<name>.*.tmp`` beside ``path``); ``before_replace()`` runs after the data is on
    disk and before the rename (e.g. to keep the old version under another name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        _remove_stale_temporaries(path)
        fd, tmp = _new_temporary(path)
        f = os.fdopen(fd, "wb")
    else:
        f = open(tmp, "wb")
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path
