"""Reuse of freed CPU memory inside the engine's hot loops.

``with reuse_cpu_memory(): ...`` makes torch's CPU allocator keep freed blocks
of 64 KiB and more in free lists (keyed by size, rounded up to 4 KiB) and hand
them out again, instead of returning them to glibc, which gives blocks that
large back to the OS.  Inside a Neumann loop every Hessian-vector product
allocates the same activation-sized buffers, and first-touching fresh pages
for them is avoidable work: one ConvNet hyper-step at K = 5 ran 1.19x faster
with the cache on a 2-core machine (``python/bench_engine_paths.py``,
BENCHMARKS.md).  Closing the outermost scope releases the cached blocks;
blocks still alive then are released when they are freed.  Scopes nest and
are process-wide.  The first scope installs the allocator as torch's CPU
allocator and it stays installed, passing every call through to torch's
``alloc_cpu``/``free_cpu`` outside scopes (oneDNN frees raw buffers with the
allocator installed at free time: see ``csrc/cpu/memory.cpp``).  The cache holds
at most the peak of the bytes the scope handed out and still alive.  A forked
child (a DataLoader worker) caches nothing.

The engine opens a scope around ``implicit_hypergradient`` and around each
BPTT outer step of the trainers.  ``COMMENTARIES_EXT_REUSE_CPU_MEMORY=0``
turns it off everywhere (then the scope does nothing).  Without the compiled
extension it does nothing either.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import _compiled


def enabled() -> bool:
    """Whether scopes cache memory here (compiled extension loaded, not switched off)."""
    return _compiled.loaded() and os.environ.get("COMMENTARIES_EXT_REUSE_CPU_MEMORY", "1") != "0"


@contextlib.contextmanager
def reuse_cpu_memory():
    """Cache freed CPU blocks of >= 64 KiB until the outermost scope closes."""
    opened = enabled() and torch.ops.commentaries_ext.cpu_memory_cache_enter()
    try:
        yield
    finally:
        if opened:
            torch.ops.commentaries_ext.cpu_memory_cache_exit()


def stats() -> dict:
    """Counters of the caching allocator since the process started."""
    if not _compiled.loaded():
        return {"hits": 0, "misses": 0, "cached_bytes": 0, "open_scopes": 0}
    hits, misses, cached, depth = torch.ops.commentaries_ext.cpu_memory_cache_stats()
    return {"hits": hits, "misses": misses, "cached_bytes": cached, "open_scopes": depth}
