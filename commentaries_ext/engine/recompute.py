"""Saved tensors recomputed in the backward pass instead of kept.

In an unrolled inner loop (backpropagation through training) every step's graph keeps its
saved tensors until the outer backward.  Some of the largest are cheap functions of much
smaller tensors that the graph keeps anyway.  On the reference ConvNet, per step:

* the first convolution's output (what BatchNorm keeps): 25 multiply-adds per element from an
  input eight times smaller;
* the gradient BatchNorm's double backward keeps, ``scatter(g_pool, idx) * relu_mask``: from the
  pooled gradient (a quarter of its size), the pool's indices and the ReLU mask, which the
  graph keeps already.

Within :class:`recompute_cheap`, the rule Functions (:mod:`.conv`, :mod:`.pooling`,
:mod:`.activation`) :func:`register` such outputs with a recipe, and a saved-tensors hook
keeps the recipe in place of the tensor and re-runs it when the backward reads it.  A
recipe's inputs that are themselves registered are kept as their recipes, so chains cost no
memory.  Recomputation repeats the same kernels on the same inputs: values (hence gradients)
equal the kept ones bit for bit.  A recipe input modified in place raises, as autograd does.
"""
from __future__ import annotations

import threading

import torch

# The registries of the contexts open on each thread (thread id -> stack). A GPU backward runs on
# autograd's device threads, not on the thread that opened the context (the saved-tensors hooks
# follow it there, a threading.local would not): a thread with no context of its own uses the
# context of the one thread that has one, if exactly one does.
_lock = threading.Lock()
_stacks: dict[int, list] = {}


def _registries() -> list:
    if not _stacks:  # no context anywhere (the common case outside an unroll): no lock
        return []
    own = _stacks.get(threading.get_ident())
    if own:
        return own
    with _lock:
        return next(iter(_stacks.values())) if len(_stacks) == 1 else []


def _key(t: torch.Tensor):
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


class _Recipe:
    """``fn(*args)`` under no_grad; args are tensors (version-checked) or other recipes."""

    __slots__ = ("fn", "args", "versions", "held")

    def __init__(self, fn, args, out):
        self.fn, self.args = fn, args
        self.versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        # the value itself while its step's context is open (dropped on exit), and again once
        # recomputed: a value saved by several nodes (the first convolution's output, three per
        # step of the reference ConvNet) is recomputed once; it lives as long as the recipe, i.e.
        # until the last node that saved it has run (autograd then releases its saved tensors)
        self.held = out

    def value(self) -> torch.Tensor:
        if self.held is not None:
            return self.held
        args = []
        for a, v in zip(self.args, self.versions):
            if isinstance(a, _Recipe):
                a = a.value()
            elif v is not None and a._version != v:
                raise RuntimeError("recompute_cheap: a tensor needed to recompute a saved tensor was modified "
                                   f"in place (version {a._version}, expected {v})")
            args.append(a)
        with torch.no_grad():
            out = self.fn(*args)
        self.held = out
        return out


def active() -> bool:
    """Whether a :class:`recompute_cheap` context is open on this thread (or serves it: see
    ``_stacks``)."""
    return bool(_registries())


def _lookup(t):
    if not isinstance(t, torch.Tensor) or not _registries():
        return None
    reg = _registries()[-1]
    if t.data_ptr() not in reg["ptrs"]:  # the common case, cheaply
        return None
    entry = reg["recipes"].get(_key(t))
    if entry is None:
        return None
    _, version, recipe = entry
    return recipe if t._version == version else None


# Smaller tensors are kept: below this a recomputation's Python and dispatch overhead (tens
# of microseconds) outweighs the memory it saves.
MIN_BYTES = 1 << 18


def register(out: torch.Tensor, fn, *args) -> None:
    """Declare ``out == fn(*args)`` (cheap to recompute) within :class:`recompute_cheap`; a no-op
    outside it or for a tensor under ``MIN_BYTES``."""
    if not _registries() or out.numel() * out.element_size() < MIN_BYTES:
        return
    args = tuple(_lookup(a) or a for a in args)
    _add(out, _Recipe(fn, args, out))


def _add(out, recipe):
    # (the registry holds the tensor until the context closes: its storage cannot be reused under the key)
    reg = _registries()[-1]
    reg["ptrs"].add(out.data_ptr())
    reg["recipes"][_key(out)] = (out, out._version, recipe)


def _pack(t):
    return _lookup(t) or t


def _unpack(x):
    if not isinstance(x, _Recipe):
        return x
    out = x.value()
    if _registries():  # read within the context (a backward building a graph): saved again as the recipe
        _add(out, x)
    return out


class recompute_cheap:
    """Context in which tensors saved for backward that a rule registered are kept as recipes."""

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        self._hooks.__enter__()
        with _lock:
            _stacks.setdefault(threading.get_ident(), []).append({"ptrs": set(), "recipes": {}})
        return self

    def __exit__(self, *exc):
        tid = threading.get_ident()
        with _lock:
            reg = _stacks[tid].pop()
            if not _stacks[tid]:
                del _stacks[tid]
        for _, _, recipe in reg["recipes"].values():
            recipe.held = None
        self._hooks.__exit__(*exc)
        return False
