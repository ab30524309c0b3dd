"""A user's ``nn.Module`` as a pure function of explicit state.

``FunctionalModule(module)`` holds the names of the module's trainable
parameters and buffers and calls the module with given tensors through
``torch.func.functional_call``:

    fm = FunctionalModule(model)
    params, buffers = fm.params(), fm.buffers()      # dicts of detached copies
    out = fm(params, x)                               # buffers untouched (see below)
    out, new_buffers = fm.call_update(params, buffers, x)   # running stats functionalised

Buffers in training mode.  BatchNorm in training mode normalises with the batch
statistics; its running statistics only matter in eval mode.  ``fm(params, x)``
therefore passes ``None`` for the running statistics of modules in training mode
(so nothing is mutated -- this is what makes ``torch.func.jvp``/``linearize`` of
a gradient work with BatchNorm in training mode, and what keeps K Hessian-vector
products from updating the running statistics K times), and the real buffers for
modules in eval mode.  ``call_update`` gives the updated running statistics as
new tensors (the inputs are not mutated; a buffer not given starts from a copy of
the module's).

Compiled students.  The engine differentiates the student twice, which compiled graphs do not
support: a ``torch.compile(model)`` wrapper is unwrapped to the module it holds (same
parameters; names without ``_orig_mod.``), and submodules compiled in place
(``module.compile()``; see ``find_compiled``) run eagerly inside its calls.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call

_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


def uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``, possibly nested), else ``module``."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


@contextlib.contextmanager
def eager_calls(compiled: list[nn.Module]):
    """The given submodules compiled in place (``module.compile()``) run eagerly inside."""
    impls = [(m, m._compiled_call_impl) for m in compiled]
    for m, _ in impls:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in impls:
            m._compiled_call_impl = impl


# modules that draw random numbers in training mode (MultiheadAttention: its attention dropout)
_RANDOM_TYPES = (nn.modules.dropout._DropoutNd, nn.RReLU, nn.MultiheadAttention)


@contextlib.contextmanager
def random_modules_eval(*modules: nn.Module | None):
    """Dropout (every kind), RReLU and MultiheadAttention inside ``modules`` in eval mode (their
    own flag only: not their submodules'), restored on exit.

    The implicit hypergradient needs one deterministic training loss: the engine evaluates
    it several times per hyper-step (the Hessian's graph or trace, the mixed term), and a
    module in training mode would draw other masks in each evaluation.  In eval mode they
    are their expectation (dropout's identity, RReLU's mean slope)."""
    switched = [m for mod in modules if mod is not None for m in mod.modules()
                if isinstance(m, _RANDOM_TYPES) and m.training]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


class FunctionalModule:
    def __init__(self, module: nn.Module, *, trainable_only: bool = True):
        module = uncompiled(module)
        self.module = module
        self.find_compiled()
        # frozen parameters are not passed: functional_call(strict=False) reads them from the
        # module at each call, so one reassigned later (load_state_dict(assign=True)) is seen
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        # Buffers owned by norm layers (running stats): mutable state of training mode.
        self._stat_owner: dict[str, nn.Module] = {}
        for mname, mod in module.named_modules():
            if isinstance(mod, _NORM_TYPES):
                for bname, _ in mod.named_buffers(recurse=False):
                    self._stat_owner[f"{mname}.{bname}" if mname else bname] = mod

    def find_compiled(self) -> None:
        """Look again for submodules compiled in place (done when made: walking the modules on
        every call would cost the inner steps of unroll; the wrapper looks again per hyper-step,
        for a ``module.compile()`` after its first one)."""
        self._compiled = [m for m in self.module.modules() if getattr(m, "_compiled_call_impl", None) is not None]

    # ------------------------------------------------------------------ state
    def params(self, *, detach: bool = True) -> dict[str, torch.Tensor]:
        named = dict(self.module.named_parameters())
        return {n: (named[n].detach() if detach else named[n]) for n in self.param_names}

    def buffers(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self.module.named_buffers()}

    def load_(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor] | None = None) -> None:
        """Copy functional state back into the module (in place, no grad)."""
        with torch.no_grad():
            named = dict(self.module.named_parameters())
            for n, v in params.items():
                named[n].copy_(v)
            if buffers:
                nb = dict(self.module.named_buffers())
                for n, v in buffers.items():
                    if v is not None:
                        nb[n].copy_(v)

    # ------------------------------------------------------------------ calls
    def _frozen_buffers(self, buffers: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
        src = self.buffers() if buffers is None else buffers
        out: dict[str, Any] = {}
        for n in self.buffer_names:
            owner = self._stat_owner.get(n)
            if owner is not None and owner.training:
                out[n] = None  # batch statistics are used; do not mutate running stats
            else:
                out[n] = src[n]
        return out

    def __call__(self, params: Mapping[str, torch.Tensor], *args, buffers: Mapping[str, torch.Tensor] | None = None, **kwargs):
        state = dict(params)
        state.update(self._frozen_buffers(buffers))
        return self._call(state, args, kwargs)

    def _call(self, state, args, kwargs):
        if not self._compiled:
            return functional_call(self.module, state, args, kwargs, strict=False)
        with eager_calls(self._compiled):
            return functional_call(self.module, state, args, kwargs, strict=False)

    def call_update(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor], *args, **kwargs):
        """``(output, new_buffers)``: running statistics updated out of place.

        A buffer missing from ``buffers`` (e.g. ``unroll`` without ``buffers=``) starts from a
        copy of the module's own, and is in ``new_buffers``: the module is never mutated."""
        new_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        # functional_call(strict=False) would use the module's tensor for a missing name, and
        # BatchNorm in training mode would update that in place
        missing = [n for n in self.buffer_names if n not in new_buffers]
        if missing:  # (unroll passes them all: no walk over the module's buffers per inner step)
            own = self.buffers()
            new_buffers.update({n: own[n].detach().clone() for n in missing})
        state = dict(params)
        state.update(new_buffers)
        return self._call(state, args, kwargs), new_buffers
