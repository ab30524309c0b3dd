"""Atomic replacement of a file, shared by commentary files and checkpoints.

A new version is written to a temporary file in the same folder, flushed and
fsynced, then renamed over the old one (``os.replace``, atomic on POSIX) and the
folder is fsynced so that the rename survives a power loss. A crash at any point
leaves either the old file or the new one, never a mix; on an error the
temporary file is removed.
"""
from __future__ import annotations

import os
import tempfile
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, tmp: Path | None = None,
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Replace ``path`` by what ``write(f)`` writes. ``tmp``: the temporary file (default: a
    fresh ``.<name>.*.tmp`` beside ``path``); ``before_replace()`` runs after the data is on
    disk and before the rename (e.g. to keep the old version under another name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes the file readable by its owner only: give the new file the mode a plain
        # open() would (0666 less the umask), as the file it replaces had
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        f = os.fdopen(fd, "wb")
        tmp = Path(name)
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
