"""Backpropagation through training (Algorithm 1): functional, differentiable
inner optimisers and the unrolled inner loop.

Optimisers (results match ``torch.optim`` step by step for the same
hyperparameters; hyperparameters may be tensors requiring grad):

    SGD(lr, momentum=0, dampening=0, weight_decay=0, nesterov=False)
    Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
         decoupled_weight_decay=False)   # True: AdamW's decay, p *= 1 - lr * weight_decay
    from_torch(optimizer)            # the spec of an existing torch.optim optimizer (AdamW too)

Each has ``init(params) -> state`` and ``step(params, grads, state) -> (params, state)``
over dicts of tensors, built from differentiable out-of-place ops.

``unroll(loss_fn, params, optimizer, batches, hparams=..., buffers=..., truncate=k,
checkpoint=s)`` runs the inner steps; ``loss_fn(params, buffers, hparams, batch)``
returns a scalar or ``(scalar, new_buffers)`` (``FunctionalModule.call_update``
gives the new running statistics of BatchNorm out of place).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .. import backend
from .._transforms import dual_level_active as _dual_level_active
from .._transforms import functorch_active as _functorch_active
from ..ops import solver as _solver_ops  # noqa: F401  (registers the adam_step kernel ops)
from ..reference import solver as _reference_solver
from .activation import relu_rules
from .batchnorm import batch_norm_reverse_rules
from .conv import conv_rules
from .linear import linear_rules
from .pooling import pool_rules
from .recompute import recompute_cheap
from .rules import rules


def _t(x, like):
    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=like.dtype, device=like.device)


class SGD:
    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.maximize = weight_decay, nesterov, maximize

    def init(self, params):
        return {"step": 0, "buf": {k: None for k in params}}

    def step(self, params, grads, state):
        new_p, new_buf = {}, {}
        first = state["step"] == 0
        for k, p in params.items():
            g = grads[k]
            if g is None:
                new_p[k], new_buf[k] = p, state["buf"][k]
                continue
            if self.maximize:
                g = -g
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                b = state["buf"][k]
                b = g if b is None else b * self.momentum + (1 - self.dampening) * g
                new_buf[k] = b
                g = g + self.momentum * b if self.nesterov else b
            else:
                new_buf[k] = None
            new_p[k] = p - self.lr * g
        return new_p, {"step": state["step"] + 1, "buf": new_buf}


class Adam:
    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad, self.maximize = weight_decay, amsgrad, maximize
        self.decoupled_weight_decay = bool(decoupled_weight_decay)

    def _decay(self, p, g):
        """``(p, g)`` after weight decay, in torch.optim.Adam's order: decoupled (AdamW) shrinks
        the parameter before the update and leaves the moments alone; coupled adds it to g."""
        if not self.weight_decay:
            return p, g
        if self.decoupled_weight_decay:
            return p * (1 - self.lr * self.weight_decay), g
        return p, g + self.weight_decay * p

    def init(self, params):
        z = {k: torch.zeros_like(p, memory_format=torch.preserve_format).detach() for k, p in params.items()}
        st = {"step": 0, "m": dict(z), "v": {k: torch.zeros_like(p).detach() for k, p in params.items()}}
        if self.amsgrad:
            st["vmax"] = {k: torch.zeros_like(p).detach() for k, p in params.items()}
        return st

    def step(self, params, grads, state):
        b1, b2 = self.betas
        t = state["step"] + 1
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        if _fused_adam_applies(self, grads):
            return self._fused_step(params, grads, state, t, bc1, bc2)
        new_p, m_new, v_new, vmax_new = {}, {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if g is None:
                new_p[k], m_new[k], v_new[k] = p, state["m"][k], state["v"][k]
                if self.amsgrad:
                    vmax_new[k] = state["vmax"][k]
                continue
            if self.maximize:
                g = -g
            p, g = self._decay(p, g)
            m = torch.lerp(state["m"][k], g, 1 - b1)  # as torch.optim.Adam
            v = state["v"][k] * b2 + (1 - b2) * g * g
            m_new[k], v_new[k] = m, v
            if self.amsgrad:
                vm = torch.maximum(state["vmax"][k], v)
                vmax_new[k] = vm
                v_use = vm
            else:
                v_use = v
            # torch.optim.Adam: denom = sqrt(v)/sqrt(bc2) + eps ; p -= lr/bc1 * m/denom
            # (sqrt at 0 has an infinite derivative: guard where v == 0)
            denom = _safe_sqrt(v_use) / math.sqrt(bc2) + self.eps
            new_p[k] = p - (self.lr / bc1) * m / denom
        st = {"step": t, "m": m_new, "v": v_new}
        if self.amsgrad:
            st["vmax"] = vmax_new
        return new_p, st

    def _fused_step(self, params, grads, state, t, bc1, bc2):
        """The step as one autograd node (:class:`_AdamStep`) over the parameters that have a gradient."""
        keys = [k for k in params if grads[k] is not None]
        ps, gs = [], []
        for k in keys:
            # decoupled decay is a separate differentiable op before the node (the kernel has no decay)
            p, g = self._decay(params[k], -grads[k] if self.maximize else grads[k])
            ps.append(p)
            gs.append(g)
        n = len(keys)
        hp = (float(self.lr), float(self.betas[0]), float(self.betas[1]), float(self.eps), bc1, bc2)
        out = _AdamStep.apply(hp, n, *ps, *gs, *[state["m"][k] for k in keys],
                              *[state["v"][k] for k in keys]) if n else ()
        new_p, m_new, v_new = dict(params), dict(state["m"]), dict(state["v"])
        for i, k in enumerate(keys):
            new_p[k], m_new[k], v_new[k] = out[i], out[n + i], out[2 * n + i]
        return new_p, {"step": t, "m": m_new, "v": v_new}


def _fused_adam_applies(opt, grads) -> bool:
    """Float hyperparameters, no amsgrad, outside torch.func transforms and forward-mode AD (a
    classic autograd.Function without a jvp)."""
    hyper = (opt.lr, opt.betas[0], opt.betas[1], opt.eps, opt.weight_decay)
    return (not opt.amsgrad and not any(torch.is_tensor(h) for h in hyper) and not _functorch_active()
            and not _dual_level_active() and any(g is not None for g in grads.values()))


class _AdamStep(torch.autograd.Function):
    """``torch.optim.Adam``'s update for k parameters as one autograd node: the kernel ops
    ``adam_step`` / ``adam_step_backward`` (``ops/solver.py``; the C++ kernel on the CPU, one
    pass over all the tensors each).

    Inputs ``hp = (lr, beta1, beta2, eps, bc1, bc2)``, ``k``, then ``p, g, m, v`` (k tensors each);
    outputs ``p', m', v'``.  The graph the stock ops would record keeps about six tensors per
    parameter and a dozen nodes; this keeps ``g, m', v'`` and one node, which was most of the
    inner step of a small student (MLP BPTT: about half its time).  A backward with
    ``create_graph`` runs the reference backward, which is built from differentiable ops."""

    @staticmethod
    def forward(ctx, hp, k, *ts):
        p, g, m, v = ts[:k], ts[k:2 * k], ts[2 * k:3 * k], ts[3 * k:]
        p_new, m_new, v_new = _adam_kernel("adam_step", ts)(list(p), list(g), list(m), list(v), *hp)
        ctx.hp, ctx.k = hp, k
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*g, *m_new, *v_new)
        return (*p_new, *m_new, *v_new)

    @staticmethod
    def backward(ctx, *grad_out):
        k = ctx.k
        saved = ctx.saved_tensors
        g, m_new, v_new = list(saved[:k]), list(saved[k:2 * k]), list(saved[2 * k:])
        P, M, V = list(grad_out[:k]), list(grad_out[k:2 * k]), list(grad_out[2 * k:])
        need = ctx.needs_input_grad[2:]
        mask = [any(need[k:2 * k]), any(need[2 * k:3 * k]), any(need[3 * k:])]
        if not any(mask):  # only p's gradient (the identity) is asked for
            return (None, None, *[P[i] if need[i] else None for i in range(k)], *([None] * (3 * k)))
        if torch.is_grad_enabled():  # create_graph: the differentiable reference
            bwd = _reference_solver.adam_step_backward
        else:
            bwd = _adam_kernel("adam_step_backward", [*g, *m_new, *v_new, *(t for t in P + M + V if t is not None)])
        dg, dm, dv = bwd(P, M, V, g, m_new, v_new, *ctx.hp, mask)

        def wanted(grads, first):  # the grads of inputs first .. first + k - 1, None where not needed
            return [grads[i] if (grads and need[first + i]) else None for i in range(k)]

        return (None, None, *wanted(P, 0), *wanted(dg, k), *wanted(dm, 2 * k), *wanted(dv, 3 * k))


def _adam_kernel(op, tensors):
    """The backend kernel of ``op``; the reference where the C++ contract (contiguous tensors of
    one float dtype) does not hold."""
    t0 = tensors[0]
    if t0.device.type == "cpu" and not (t0.dtype in (torch.float32, torch.float64)
                                        and all(t.is_contiguous() and t.dtype == t0.dtype for t in tensors)):
        return getattr(_reference_solver, op)
    return backend.helper_kernel(op, t0.device)  # a forced backend without this op (triton, cuda): the reference


def _safe_sqrt(x):
    if not x.requires_grad:
        return torch.sqrt(x)
    # differentiable everywhere v > 0 (double backward included); zero where v == 0
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def from_torch(optimizer: torch.optim.Optimizer, group: int = 0):
    """The differentiable spec of a ``torch.optim`` SGD / Adam / AdamW optimizer's param group."""
    g = optimizer.param_groups[group]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        # AdamW: a subclass of Adam with decoupled_weight_decay=True in recent torch, its own class before
        decoupled = g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        return Adam(g["lr"], g["betas"], g["eps"], g["weight_decay"], g.get("amsgrad", False), g.get("maximize", False),
                    decoupled_weight_decay=decoupled)
    if isinstance(optimizer, torch.optim.SGD):
        return SGD(g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g.get("maximize", False))
    raise TypeError(f"no differentiable version of {type(optimizer).__name__} (SGD, Adam and AdamW are supported)")


@dataclass
class UnrollResult:
    params: dict
    buffers: dict
    opt_state: dict
    losses: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _call_loss(loss_fn, params, buffers, hparams, batch):
    out = loss_fn(params, buffers, hparams, batch)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, buffers


def _flatten_state(opt_state):
    """Split an optimizer state into a list of tensors and a rebuild function."""
    leaves, spec = [], []

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if torch.is_tensor(x):
            leaves.append(x)
            return ("__t__", len(leaves) - 1)
        return x

    tree = walk(opt_state)

    def rebuild(ts):
        def w(x):
            if isinstance(x, dict):
                return {k: w(v) for k, v in x.items()}
            if isinstance(x, tuple) and len(x) == 2 and x[0] == "__t__":
                return ts[x[1]]
            return x

        return w(tree)

    return leaves, rebuild


def unroll(
    loss_fn: Callable,
    params: Mapping[str, torch.Tensor],
    optimizer,
    batches: Iterable[Any],
    *,
    hparams: Mapping[str, torch.Tensor] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    opt_state: dict | None = None,
    steps: int | None = None,
    truncate: int | None = None,
    checkpoint: int | None = None,
    grad_reduce: Callable | None = None,
) -> UnrollResult:
    """Run ``steps`` differentiable inner steps (one per batch) from ``params``.

    ``batches``: any iterable; with ``steps`` only its first ``steps`` items are taken (an
    endless iterator is fine, and an iterator is left at the next unused batch); without
    ``steps`` all of them (one step each).

    ``truncate=k``: only the last ``k`` steps are differentiated (the earlier
    ones run without a graph).  ``checkpoint=s``: the differentiated steps are
    grouped into segments of ``s`` steps whose activations are recomputed in
    the backward pass (activation checkpointing; memory per segment instead of
    per step, ``s ~ sqrt(T)`` gives sub-linear growth; the backward runs ``loss_fn`` again, so
    state it changes in place -- a module's own BatchNorm statistics -- changes twice: pass such
    state through ``buffers``, as ``learn_bptt`` does for the student and restores for the
    commentary).  The returned params are
    functions of ``hparams`` (and of the initial params if they require grad):
    backpropagate a validation loss through them.

    ``grad_reduce(grads) -> grads`` (several processes, each rank unrolling on its
    shard of every batch): combines each step's student gradients over the ranks
    before the optimiser step, differentiably (e.g. ``ShardReducer.train`` of
    ``commentaries_ext.distributed``: an all-reduce whose backward is the adjoint
    all-reduce), so that every rank follows the union's trajectory.
    """
    hparams = {} if hparams is None else dict(hparams)
    buffers = {} if buffers is None else {k: v.detach() for k, v in buffers.items()}
    for name, v in (("steps", steps), ("truncate", truncate), ("checkpoint", checkpoint)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"unroll: {name} must be None or an int >= 0, got {v!r}")
    # with steps, take only the batches used: an endless stream or a long DataLoader is not drained
    batches = list(batches) if steps is None else list(itertools.islice(batches, steps))
    T = len(batches) if steps is None else steps
    if T > len(batches):
        raise ValueError(f"steps={T} but only {len(batches)} batches were given")
    params = dict(params)
    state = optimizer.init(params) if opt_state is None else opt_state
    n_free = 0 if truncate is None else max(0, T - int(truncate))
    losses = []

    def one_step(params, state, buffers, batch, create_graph):
        return _step(loss_fn, optimizer, params, state, buffers, hparams, batch, create_graph, grad_reduce)

    # free (untracked) prefix
    for i in range(n_free):
        params, state, buffers, L = one_step(params, _detach_state(state), buffers, batches[i], False)
        losses.append(L)
    if n_free:
        params = {k: v.detach() for k, v in params.items()}
        state = _detach_state(state)

    tracked = list(range(n_free, T))
    if not checkpoint or checkpoint <= 0:
        for i in tracked:
            params, state, buffers, L = one_step(params, state, buffers, batches[i], True)
            losses.append(L)
    else:
        seg = int(checkpoint)
        pnames, hnames = list(params), list(hparams)
        for s0 in range(0, len(tracked), seg):
            idx = tracked[s0 : s0 + seg]
            st_leaves, rebuild = _flatten_state(state)
            n_p, n_s = len(pnames), len(st_leaves)
            box = {}

            def run(flat, create_graph, idx=idx, rebuild=rebuild, n_p=n_p, n_s=n_s, buf_in=dict(buffers), box=box):
                p = dict(zip(pnames, flat[:n_p]))
                s = rebuild(list(flat[n_p : n_p + n_s]))
                h = dict(zip(hnames, flat[n_p + n_s :]))
                b = buf_in
                ls = []
                for i in idx:
                    p, s, b, L = _step(loss_fn, optimizer, p, s, b, h, batches[i], create_graph, grad_reduce)
                    ls.append(L)
                out_leaves, reb2 = _flatten_state(s)
                if not box:
                    box["buffers"], box["losses"], box["rebuild"] = b, ls, reb2
                return tuple(p[k] for k in pnames) + tuple(out_leaves)

            out = _Segment.apply(run, *[params[k] for k in pnames], *st_leaves, *[hparams[k] for k in hnames])
            params = dict(zip(pnames, out[:n_p]))
            state = box["rebuild"](list(out[n_p:]))
            buffers = box["buffers"]
            losses.extend(box["losses"])
    return UnrollResult(params=params, buffers=buffers, opt_state=state, losses=losses,
                        info={"steps": T, "tracked": len(tracked), "checkpoint": checkpoint})


def _reduce_grads(grad_reduce, gs):
    """``grad_reduce`` on the gradients that exist (None stays None, alike on every rank)."""
    if grad_reduce is None:
        return gs
    idx = [i for i, g in enumerate(gs) if g is not None]
    red = grad_reduce([gs[i] for i in idx])
    out = list(gs)
    for i, g in zip(idx, red):
        out[i] = g
    return tuple(out)


def _step(loss_fn, optimizer, params, state, buffers, hparams, batch, create_graph, grad_reduce=None):
    # the CPU fast paths of engine/pooling.py and engine/conv.py, and the mask-keeping ReLU of
    # engine/activation.py (with create_graph the backward graph they build is the one the
    # outer backward differentiates, kept for every step); in that graph and in the optimiser
    # step's, the tensors they register as cheap to recompute are kept as recipes
    # (engine/recompute.py; the weight gradients of engine/linear.py, which the step keeps)
    keep_less = recompute_cheap() if create_graph and not _functorch_active() else contextlib.nullcontext()
    with keep_less:
        with torch.enable_grad(), rules(pool_rules(), conv_rules(), relu_rules(), linear_rules(),
                                        batch_norm_reverse_rules()):
            if create_graph:
                params = {k: (v if v.requires_grad else v.detach().requires_grad_(True)) for k, v in params.items()}
            else:
                params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss, new_buffers = _call_loss(loss_fn, params, buffers, hparams, batch)
            gs = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
            gs = _reduce_grads(grad_reduce, gs)
        grads = dict(zip(params, gs))
        new_buffers = {k: v.detach() for k, v in new_buffers.items()}
        if create_graph:
            new_p, new_s = optimizer.step(params, grads, state)
        else:
            with torch.no_grad():
                new_p, new_s = optimizer.step({k: v.detach() for k, v in params.items()}, grads, state)
    return new_p, new_s, new_buffers, loss.detach()


class _Segment(torch.autograd.Function):
    """Activation checkpointing of a run of inner steps: the forward keeps only the
    segment's input state; the backward re-runs the steps with a graph and
    backpropagates through them (the hparams are explicit inputs)."""

    @staticmethod
    def forward(ctx, run, *flat):
        ctx.run = run
        ctx.save_for_backward(*flat)
        # the re-run must draw the same random numbers (a student's Dropout masks) as this run
        ctx.cuda_devices = sorted({t.device.index or 0 for t in flat if t.device.type == "cuda"})
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices])
        with torch.no_grad():
            out = run([t.detach() for t in flat], False)
        return tuple(o.detach() for o in out)

    @staticmethod
    def backward(ctx, *grad_out):
        flat = ctx.saved_tensors
        with torch.enable_grad(), torch.random.fork_rng(devices=ctx.cuda_devices):
            torch.set_rng_state(ctx.rng[0])
            for d, st in zip(ctx.cuda_devices, ctx.rng[1]):
                torch.cuda.set_rng_state(st, d)
            inputs = [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t.detach() for t in flat]
            out = ctx.run(inputs, True)
            pairs = [(o, g) for o, g in zip(out, grad_out) if o.requires_grad and g is not None]
            want = [i for i, t in enumerate(inputs) if t.requires_grad]
            gs = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in want], [g for _, g in pairs],
                                     allow_unused=True) if pairs and want else []
        result = [None] * len(inputs)
        for i, g in zip(want, gs):
            result[i] = g
        return (None, *result)


def _detach_state(state):
    if isinstance(state, dict):
        return {k: _detach_state(v) for k, v in state.items()}
    if torch.is_tensor(state):
        return state.detach()
    return state
