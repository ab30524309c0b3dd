"""Linearise-once forward-over-reverse Hessian-vector products.

The function ``(theta, phi, batch, c) -> (g_theta, H c, d(g_theta . c)/dphi)``
(``torch.func.jvp`` of ``torch.func.grad``) is traced once per training loss
and input shapes with ``make_fx``, and its graph is split into

* a *primal* part: every node that does not depend on the tangent ``c`` (the
  forward and backward pass at ``(theta, phi, batch)``); it runs once per
  operator, i.e. once per hyper-step, and keeps the intermediates the tangent
  part needs;
* *tangent* parts: the nodes that depend on ``c``, dead-code-eliminated for the
  two products the solvers need (``H c`` alone, and the mixed term alone).

Each further product then costs only the tangent computation.  Unlike
``torch.func.linearize`` nothing is re-traced when ``theta``/``phi``/the batch
change (they are graph inputs, not constants).  The first trace of each entry
is validated against the eager ``jvp(grad)``; a loss that cannot be traced or
whose trace disagrees (data-dependent Python control flow) raises, and
``hvp="auto"`` then falls back to double backward. So does a trace whose
in-place writes the split would lose (:class:`UnsplittableTrace`: an ATen
decomposition that fills a buffer through ``copy_`` into views of it and reads
the buffer, as circular padding does): the split follows each node's inputs,
which do not show such a write, and the first validation alone cannot be
relied on (uninitialised memory may happen to hold the right values).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.func import grad as fgrad
from torch.func import jvp as fjvp
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batchnorm import batch_norm_rules
from .hvp import scalar_loss
from .pooling import pool_channels_last
from .conv import CONV_BWD, fold_is_faster, input_grad_by_fold

_FALLBACK_CACHE: dict = {}  # key -> _Traced
MAX_ENTRIES = 8


def _sig(xs):
    """Tensors by their metadata (they are graph inputs); anything else as a trace freezes it."""
    return tuple((tuple(x.shape), x.dtype, x.device.type, x.requires_grad) if torch.is_tensor(x)
                 else ("obj", _batch_sig(x)) for x in xs)


class _Traced:
    def __init__(self, loss, pnames, hnames, th, ph, batch_leaves, batch_spec, batch_consts):
        from torch.fx.experimental.proxy_tensor import make_fx

        nP, nQ, nB = len(pnames), len(hnames), len(batch_leaves)
        self.nP, self.nQ, self.nB = nP, nQ, nB
        tensor_pos = [i for i, b in enumerate(batch_leaves) if torch.is_tensor(b)]
        self.tensor_pos = tensor_pos

        def f(*flat):
            th_l = flat[:nP]
            ph_l = flat[nP : nP + nQ]
            b_t = flat[nP + nQ : nP + nQ + len(tensor_pos)]
            c_l = flat[nP + nQ + len(tensor_pos) :]
            leaves = list(batch_consts)
            for pos, t in zip(tensor_pos, b_t):
                leaves[pos] = t
            batch = tree_unflatten(leaves, batch_spec)
            ph = dict(zip(hnames, ph_l))

            def g(th_d):
                if nQ:
                    return fgrad(lambda t, h: scalar_loss("train_loss", loss(t, h, batch)), argnums=(0, 1))(th_d, ph)
                return fgrad(lambda t: scalar_loss("train_loss", loss(t, ph, batch)))(th_d), {}

            with rules:  # BatchNorm's backward in a few passes per product
                (gt, gp), (ht, hp) = fjvp(g, (dict(zip(pnames, th_l)),), (dict(zip(pnames, c_l)),))
            return tuple(gt[k] for k in pnames) + tuple(ht[k] for k in pnames) + tuple(hp[k] for k in hnames)

        rules = batch_norm_rules()
        example = list(th) + list(ph) + [batch_leaves[i] for i in tensor_pos] + [torch.zeros_like(t) for t in th]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = make_fx(f, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)
        self.gm = gm
        self.uses_batch_norm_rules = rules.calls > 0
        self.dropped_zero_adds = _drop_zero_adds(gm)
        self.pooled_channels_last = pool_channels_last(gm)
        self.lowered_input_grads = _lower_input_grads(gm)
        self.merged_input_grads = _merge_input_grads(gm)  # those left to oneDNN
        self._split(gm)

    def _split(self, gm):
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        n_in = self.nP + self.nQ + len(self.tensor_pos)
        tangent_in = set(placeholders[n_in:])
        primal_in = placeholders[:n_in]
        tangent = set(tangent_in)
        order = list(graph.nodes)
        for n in order:
            if n.op in ("call_function", "call_method", "call_module"):
                if any(a in tangent for a in n.all_input_nodes):
                    tangent.add(n)
        out_node = [n for n in order if n.op == "output"][0]
        outs = out_node.args[0]
        P, Q = self.nP, self.nQ
        g_outs, hc_outs, m_outs = outs[:P], outs[P : 2 * P], outs[2 * P : 2 * P + Q]

        def build_tangent(wanted):
            # nodes (transitively) needed for `wanted`
            need, stack = set(), [w for w in wanted if isinstance(w, fx.Node)]
            while stack:
                n = stack.pop()
                if n in need:
                    continue
                need.add(n)
                if n in tangent and n not in tangent_in:
                    stack.extend(n.all_input_nodes)
            boundary = [n for n in order if n in need and n not in tangent]  # primal values used
            g2 = fx.Graph()
            env = {}
            for n in boundary:
                env[n] = g2.placeholder(f"pr_{n.name}")
            for n in placeholders[n_in:]:
                env[n] = g2.placeholder(n.name)
            for n in order:
                if n in need and n in tangent and n not in tangent_in:
                    env[n] = g2.node_copy(n, lambda a: env[a])
            g2.output(tuple(env[w] if isinstance(w, fx.Node) else w for w in wanted))
            return fx.GraphModule(gm, g2), boundary, {n for n in need if n in tangent and n not in tangent_in}

        self.hvp_gm, hvp_b, hvp_nodes = build_tangent(hc_outs)
        self.mix_gm, mix_b, mix_nodes = build_tangent(m_outs) if Q else (None, [], set())
        # primal graph: outputs g_theta and every boundary value
        boundary = []
        seen = set()
        for n in hvp_b + mix_b:
            if n not in seen:
                seen.add(n)
                boundary.append(n)
        self.boundary = boundary
        self.hvp_idx = [boundary.index(n) for n in hvp_b]
        self.mix_idx = [boundary.index(n) for n in mix_b]
        need, stack = set(), [n for n in list(g_outs) + boundary if isinstance(n, fx.Node)]
        while stack:
            n = stack.pop()
            if n in need:
                continue
            need.add(n)
            stack.extend(n.all_input_nodes)
        _check_split_mutations(order, tangent, [{n for n in need if n not in tangent}, hvp_nodes, mix_nodes])
        g1 = fx.Graph()
        env = {}
        for n in primal_in:
            env[n] = g1.placeholder(n.name)
        for n in order:
            if n in need and n.op != "placeholder" and n not in tangent:
                env[n] = g1.node_copy(n, lambda a: env[a])
        g1.output(tuple(env[n] if isinstance(n, fx.Node) else n for n in list(g_outs) + boundary))
        self.primal_gm = fx.GraphModule(gm, g1)
        for m in (self.primal_gm, self.hvp_gm, self.mix_gm):
            if m is not None:
                _narrow_outputs(m)


class UnsplittableTrace(RuntimeError):
    """The traced graph writes into a tensor in place in a way the primal / tangent split
    would lose (the write is only seen through another alias of that tensor)."""


def _alias_roots(order) -> tuple[dict, dict]:
    """Per node, the node whose storage it is (a view or an in-place op's result: its
    argument's; anything else: itself); and per in-place node, the roots it writes."""
    root, writes = {}, {}
    for n in order:
        root[n] = n
        t = n.target
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        schema = t._schema
        args = list(n.args) + [n.kwargs.get(a.name) for a in schema.arguments[len(n.args):]]
        written = [root[a] for a, sa in zip(args, schema.arguments)
                   if isinstance(a, fx.Node) and sa.alias_info is not None and sa.alias_info.is_write]
        if written:
            writes[n] = set(written)
        ret = schema.returns[0].alias_info if len(schema.returns) == 1 else None
        if ret is not None:
            for a, sa in zip(args, schema.arguments):
                if isinstance(a, fx.Node) and sa.alias_info is not None and \
                        set(sa.alias_info.before_set) & set(ret.before_set):
                    root[n] = root[a]
                    break
    return root, writes


def _check_split_mutations(order, tangent, parts) -> None:
    """Refuse a split that loses an in-place write: every part (the primal graph, the tangent
    graphs) that reads a tensor some in-place node writes (through any alias) must hold that
    node, and a tangent graph must not write into a tensor of the primal graph (its values are
    computed once and shared by every product). ATen decompositions such as circular padding
    (``new_empty`` then ``copy_`` into slices of it) are read through the buffer, not through
    the writes' results, so the dependencies the split follows miss the writes."""
    root, writes = _alias_roots(order)
    if not writes:
        return
    readers: dict = {}
    for n in order:
        readers.setdefault(root[n], set()).add(n)
    for part_i, part in enumerate(parts):
        for m, roots in writes.items():
            for r in roots:
                uses = (readers.get(r, set()) - {m}) & part
                if uses and m not in part:
                    raise UnsplittableTrace(f"the in-place {m.target} into {r.name} is lost by the split "
                                            f"(read there by {next(iter(uses)).name})")
                if m in part and part_i > 0 and r not in tangent:
                    raise UnsplittableTrace(f"the tangent graph would write {m.target} into the primal value {r.name}")


def recompiled(gm: fx.GraphModule, changed: int) -> int:
    """The end of a graph rewrite: check and regenerate ``gm`` if it changed; returns ``changed``."""
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


_ZEROS = (torch.ops.aten.zeros_like.default, torch.ops.aten.zeros.default)


def _drop_zero_adds(gm: fx.GraphModule) -> int:
    """Replace ``a + zeros`` by ``a`` where the sum has ``a``'s shape and dtype.  Forward-mode
    formulas add a zero tangent for an argument that has none (e.g. the ``self`` of
    ``threshold_backward``): on the ConvNet a fill and an add over a 3.2 MB activation per
    product."""
    changed = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.add.Tensor or n.kwargs.get("alpha", 1) != 1:
            continue
        if len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
            continue
        a, b = n.args
        keep = b if a.target in _ZEROS else a if b.target in _ZEROS else None
        out, kv = n.meta.get("val"), keep.meta.get("val") if keep is not None else None
        if keep is None or out is None or kv is None or kv.shape != out.shape or kv.dtype != out.dtype:
            continue
        if any(getattr(getattr(u.target, "_schema", None), "is_mutable", False) for u in list(n.users) + list(keep.users)):
            continue  # written in place: the sum must stay a separate tensor
        n.replace_all_uses_with(keep)
        gm.graph.erase_node(n)
        changed += 1
    return recompiled(gm, changed)


def _merge_input_grads(gm: fx.GraphModule) -> int:
    """``conv_T(a, W) + conv_T(b, V)`` (two input gradients of one convolution, as the tangent
    of a backward pass has: ``dgy`` through ``W`` plus ``gy`` through ``dW``) as one input
    gradient with the grad-outputs concatenated over channels and the weights over output
    channels: one oneDNN call instead of two and an add (~0.27 ms of a 6.4 ms ConvNet
    product), or for the matmul + col2im lowering one col2im instead of two (~0.7 ms of the
    ConvNet's mixed term)."""
    import operator

    def oneDNN_input_grad(g):
        if not (isinstance(g, fx.Node) and g.op == "call_function" and g.target is operator.getitem and g.args[1] == 0):
            return None
        c = g.args[0]
        if c.op != "call_function" or c.target is not CONV_BWD or len(c.args) != 11 or c.kwargs:
            return None
        if len(g.users) != 1 or not c.args[10][0] or c.args[7] or c.args[9] != 1:  # input grad, transposed, groups
            return None
        if any(u is not g and (u.target is not operator.getitem or u.users) for u in c.users):
            return None  # another output is used (unused getitems are left by make_fx)
        return c

    def folded_input_grad(g):
        ok = isinstance(g, fx.Node) and g.op == "call_function" and g.target is input_grad_by_fold and len(g.users) == 1
        return g if ok else None

    def same_tensors(xs, ys):
        vx = [x.meta.get("val") if isinstance(x, fx.Node) else None for x in xs]
        vy = [y.meta.get("val") if isinstance(y, fx.Node) else None for y in ys]
        return all(a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype
                   and a.device.type == "cpu" for a, b in zip(vx, vy))

    changed = 0
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.add.Tensor or n.kwargs or len(n.args) != 2:
            continue
        ca, cb = (oneDNN_input_grad(a) for a in n.args)
        fa, fb = (folded_input_grad(a) for a in n.args)
        if ca is not None and cb is not None and ca is not cb and ca.args[4:10] == cb.args[4:10] \
                and same_tensors(ca.args[:3], cb.args[:3]):
            with graph.inserting_before(n):
                go = graph.call_function(torch.ops.aten.cat.default, ([ca.args[0], cb.args[0]], 1))
                w = graph.call_function(torch.ops.aten.cat.default, ([ca.args[2], cb.args[2]], 0))
                merged = graph.call_function(CONV_BWD, (go, ca.args[1], w, None, *ca.args[4:10], [True, False, False]))
                grad = graph.call_function(operator.getitem, (merged, 0))
            dead = [ca, cb]
        elif fa is not None and fb is not None and fa is not fb and fa.args[2:] == fb.args[2:] \
                and same_tensors(fa.args[:2], fb.args[:2]):
            with graph.inserting_before(n):
                go = graph.call_function(torch.ops.aten.cat.default, ([fa.args[0], fb.args[0]], 1))
                w = graph.call_function(torch.ops.aten.cat.default, ([fa.args[1], fb.args[1]], 0))
                grad = graph.call_function(input_grad_by_fold, (go, w, *fa.args[2:]))
            dead = [fa, fb]
        else:
            continue
        grad.meta.update(n.meta)
        n.replace_all_uses_with(grad)
        graph.erase_node(n)
        for c in dead:
            for g in list(c.users):
                graph.erase_node(g)
            graph.erase_node(c)
        changed += 1
    return recompiled(gm, changed)


def _lower_input_grads(gm: fx.GraphModule) -> int:
    """Compute the input gradient of a CPU 2-D convolution (``convolution_backward``'s first
    output) by ``matmul`` + ``col2im`` where that is measured faster for its shapes."""
    import operator

    changed = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not CONV_BWD or len(n.args) != 11 or n.kwargs:
            continue
        go, x, w, _, stride, padding, dilation, transposed, _, groups, mask = n.args
        vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in (go, x, w)]
        if not mask[0] or transposed or groups != 1 or any(v is None or v.dim() != 4 for v in vals):
            continue
        if any(v.device.type != "cpu" for v in vals) or vals[0].dtype not in (torch.float32, torch.float64):
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in n.users):
            continue
        users0 = [u for u in n.users if u.args[1] == 0]
        key = (tuple(vals[0].shape), tuple(vals[1].shape), tuple(vals[2].shape), vals[0].dtype,
               tuple(stride), tuple(padding), tuple(dilation))
        if not users0 or not fold_is_faster(key):
            continue
        with gm.graph.inserting_after(n):
            new = gm.graph.call_function(input_grad_by_fold, (go, w, tuple(vals[1].shape[2:]), tuple(vals[2].shape[2:]),
                                                               tuple(stride), tuple(padding), tuple(dilation)))
        new.meta["val"] = vals[1]
        for u in users0:
            u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        n.args = tuple(n.args[:10]) + ([False] + list(mask[1:]),) + tuple(n.args[11:])
        if not n.users:
            gm.graph.erase_node(n)
        changed += 1
    return recompiled(gm, changed)


def _narrow_outputs(gm: fx.GraphModule) -> int:
    """Turn off unused outputs of multi-output ops (``convolution_backward``'s
    ``output_mask``) after the split: e.g. the input gradient of the first
    convolution, which the primal part does not need."""
    import operator

    changed = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is CONV_BWD:
            if any(u.op != "call_function" or u.target is not operator.getitem for u in n.users):
                continue
            used = {u.args[1] for u in n.users}
            mask = list(n.args[10])
            new = [bool(m) and (i in used) for i, m in enumerate(mask)]
            if new != mask:
                n.args = tuple(n.args[:10]) + (new,) + tuple(n.args[11:])
                changed += 1
    if changed:
        gm.recompile()
    return changed


class LinearizedHVP:
    """The operator for one ``(theta, phi, batch)``: primal part run once."""

    def __init__(self, traced: _Traced, th, ph, batch_tensors):
        self.t = traced
        with torch.no_grad():
            outs = traced.primal_gm(*th, *ph, *batch_tensors)
        P = traced.nP
        self._g = list(outs[:P])
        bvals = outs[P:]
        self._hvp_args = [bvals[i] for i in traced.hvp_idx]
        self._mix_args = [bvals[i] for i in traced.mix_idx]
        self.has_mixed = traced.mix_gm is not None

    def grad(self):
        return self._g

    def hvp(self, c):
        with torch.no_grad():
            return list(self.t.hvp_gm(*self._hvp_args, *[x.detach() for x in c]))

    def mixed(self, p):
        with torch.no_grad():
            return list(self.t.mix_gm(*self._mix_args, *[x.detach() for x in p]))


def _loss_key(loss):
    """Functions are keyed by code and the state they read besides their arguments
    (:func:`_state_sig`), so a closure re-created every hyper-step over the same objects hits
    the cache, and one whose state changed is traced again; other callables by identity and
    their attributes."""
    from .hvp import SplitLoss, WeightedLoss

    if isinstance(loss, WeightedLoss):
        return ("weighted", _loss_key(loss.per_example)[0], _loss_key(loss.weights)[0], loss.reduction), None
    if isinstance(loss, SplitLoss):
        return ("split", _loss_key(loss.outputs)[0], _loss_key(loss.head)[0]), None
    fn = getattr(loss, "__func__", loss)
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("obj", type(loss), id(loss), _state_sig(loss, _STATE_DEPTH)), loss
    bound = getattr(loss, "__self__", None)
    return ("fn", code, _fn_sig(fn, _STATE_DEPTH), None if bound is None else _state_sig(bound, _STATE_DEPTH)), None


# What a trace may have frozen besides the loss's arguments, and how deep it is looked for: a
# graph traced with make_fx holds Python numbers as literals and outside tensors as constants,
# so a loss reading a changed global, attribute or container entry would silently reuse stale
# values. State deeper than this, or past _STATE_ITEMS entries of a container, is not seen
# (documented in engine/__init__.py: use hvp="double_backward" for such losses).
_STATE_DEPTH = 3
_STATE_ITEMS = 64
_SCALARS = (int, float, complex, bool, str, bytes, type(None))


def _state_sig(obj, depth: int):
    """A hashable fingerprint of ``obj`` as a trace would have frozen it: numbers and strings
    by value; tensors by identity (the graph holds the tensor itself, so in-place changes are
    seen -- except through ``.item()``, which a trace turns into a number); modules by
    identity and :func:`_module_sig`; numpy arrays by content;
    containers, functions and plain objects' attributes (``__dict__`` or ``__slots__``)
    element-wise, ``depth`` levels down.  Anything it cannot read is keyed by identity."""
    try:
        return _state_sig_of(obj, depth)
    except Exception:  # noqa: BLE001 - an exotic object (a raising __getattr__ ...): by identity
        return ("id", id(obj))


def _state_sig_of(obj, depth: int):
    import types

    if type(obj) in _SCALARS:  # exact types: a subclass may define __eq__ without __hash__
        return obj
    if torch.is_tensor(obj):
        return ("tensor", id(obj))
    if isinstance(obj, torch.nn.Module):
        return ("module", id(obj), _module_sig(obj))
    if isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType)):
        return ("id", id(obj))
    if _is_numpy(obj):  # an array or numpy scalar: by value
        import hashlib

        return ("numpy", getattr(obj, "shape", ()), str(obj.dtype), hashlib.blake2b(obj.tobytes(), digest_size=16).digest())
    if depth <= 0:
        return ("id", id(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, len(obj), tuple(_state_sig(x, depth - 1) for x in obj[:_STATE_ITEMS]))
    if isinstance(obj, dict):
        items = list(obj.items())[:_STATE_ITEMS]
        return ("dict", len(obj), tuple((k if type(k) in _SCALARS else id(k), _state_sig(v, depth - 1))
                                        for k, v in items))
    if isinstance(obj, types.FunctionType):
        return ("function", _fn_sig(obj, depth - 1))
    if isinstance(obj, types.MethodType):
        return ("method", _state_sig(obj.__func__, depth - 1), _state_sig(obj.__self__, depth - 1))
    attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for cls in type(obj).__mro__:  # __slots__ classes (slots dataclasses, attrs)
        for name in getattr(cls, "__slots__", ()):
            if isinstance(name, str) and name not in attrs and hasattr(obj, name):
                attrs[name] = getattr(obj, name)
    if attrs:
        return ("object", id(obj), _state_sig(attrs, depth - 1))
    return ("id", id(obj))


def _batch_sig(x):
    """A non-tensor batch entry as a trace freezes it: numpy arrays by content (their repr
    elides the middle), anything else by value through its repr (a slice, a dataclass, a
    device), as before -- an identity would re-trace every call for an equal new object."""
    if _is_numpy(x):
        return _state_sig(x, 0)
    return ("repr", type(x), repr(x))


def _is_numpy(x) -> bool:
    """A numpy array or scalar (without importing numpy)."""
    return type(x).__module__ == "numpy" and hasattr(x, "tobytes")


def _fn_sig(fn, depth: int):
    """A Python function's code and the state it reads: the globals its code (and nested code)
    names, its closure cells and its defaults."""
    code = fn.__code__
    names, stack = set(), [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    glob = fn.__globals__
    gsig = tuple((n, _state_sig(glob[n], depth)) for n in sorted(names) if n in glob)
    cells = tuple(_state_sig(c.cell_contents, depth) if _cell_ok(c) else None for c in (fn.__closure__ or ()))
    defaults = (_state_sig(fn.__defaults__, depth), _state_sig(fn.__kwdefaults__, depth))
    return (code, gsig, cells, defaults)


def _plain(v) -> bool:
    return type(v) in _SCALARS or (type(v) is tuple and all(type(e) in _SCALARS for e in v))


def _module_sig(mod: torch.nn.Module):
    """What a trace freezes of a module and its submodules: training flags, plain attributes
    (``eps``, ``negative_slope``, a convolution's ``padding`` ...) by value, and which tensors
    the parameters, buffers and plain tensor attributes are (a trace holds them as constants: one replaced, e.g. by
    ``load_state_dict(assign=True)``, must not be read from the old one; in-place changes are
    seen through the held tensor)."""
    return tuple((id(m), m.training,
                  tuple((k, v) for k, v in vars(m).items() if k != "training" and _plain(v)),
                  tuple((k, id(v)) for k, v in vars(m).items() if torch.is_tensor(v)),  # plain tensor attributes
                  tuple((k, id(t)) for k, t in m._parameters.items()),
                  tuple((k, id(t)) for k, t in m._buffers.items()))
                 for m in mod.modules())


def _code_key(lkey):
    """What stays the same when a loss is re-created each call (for the thrash guard)."""
    if lkey[0] == "fn":
        return lkey[1]
    if lkey[0] == "obj":
        return lkey[1]
    return tuple(_code_key(k) if isinstance(k, tuple) else k for k in lkey)


def _cell_ok(c):
    try:
        c.cell_contents
        return True
    except ValueError:
        return False


_KEEP_ALIVE: dict = {}
_MISSES: dict = {}  # loss code -> cache misses in a row
MAX_TRACES_PER_CODE = 4


class TooManyTraces(RuntimeError):
    pass


def linearized_hvp(loss, th: dict, ph: dict, batch, *, auto: bool = False) -> LinearizedHVP:
    pnames, hnames = list(th), list(ph)
    leaves, spec = tree_flatten(batch)
    tensors = [l for l in leaves if torch.is_tensor(l)]
    consts = [None if torch.is_tensor(l) else l for l in leaves]
    lkey, _ = _loss_key(loss)
    key = (lkey, tuple(pnames), tuple(hnames), _sig(th.values()), _sig(ph.values()), _sig(leaves), str(spec))
    traced = _FALLBACK_CACHE.get(key)
    thl = [t.detach() for t in th.values()]
    phl = [t.detach() for t in ph.values()]
    code_key = _code_key(lkey)
    if traced is None:
        # Thrashing is a loss that misses the cache on every call; separate runs in one process
        # (a new wrapper, learn_ift call or model each time) miss once and then hit, so only
        # misses in a row count.
        _MISSES[code_key] = _MISSES.get(code_key, 0) + 1
        if auto and _MISSES[code_key] > MAX_TRACES_PER_CODE:
            raise TooManyTraces(
                "the training loss captures new objects every call, so its linearised trace cannot be "
                "reused; pass the same loss callable (batch as an argument) to use the linearised HVP"
            )
        traced = _Traced(loss, pnames, hnames, thl, phl, leaves, spec, consts)
        op = LinearizedHVP(traced, thl, phl, tensors)
        _validate(op, loss, th, ph, batch)
        if len(_FALLBACK_CACHE) >= 4 * MAX_ENTRIES:
            old = next(iter(_FALLBACK_CACHE))
            _FALLBACK_CACHE.pop(old)
            _KEEP_ALIVE.pop(old, None)
        _FALLBACK_CACHE[key] = traced
        _KEEP_ALIVE[key] = loss  # keep ids in the key valid while cached
        return op
    _MISSES[code_key] = 0
    return LinearizedHVP(traced, thl, phl, tensors)


def clear_cache() -> None:
    _FALLBACK_CACHE.clear()
    _KEEP_ALIVE.clear()
    _MISSES.clear()


def _validate(op: LinearizedHVP, loss, th, ph, batch):
    g = torch.Generator(device="cpu").manual_seed(1234)
    c = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in th.values()]
    gfn = fgrad(lambda q: scalar_loss("train_loss", loss(q, {k: v.detach() for k, v in ph.items()}, batch)))
    gref, href = fjvp(gfn, ({k: v.detach() for k, v in th.items()},), (dict(zip(th, c)),))
    got_h = op.hvp(c)
    checks = [("gradient", list(th), op.grad(), list(gref.values())), ("HVP", list(th), got_h, list(href.values()))]
    if op.has_mixed:
        th_d = {k: v.detach() for k, v in th.items()}
        gphi = lambda q: fgrad(lambda h: scalar_loss("train_loss", loss(q, h, batch)))(  # noqa: E731
            {k: v.detach() for k, v in ph.items()})
        _, mref = fjvp(gphi, (th_d,), (dict(zip(th, c)),))
        checks.append(("mixed term", list(ph), op.mixed(c), [mref[k] for k in ph]))
    for what, names, got, ref in checks:
        name = _first_mismatch(names, got, ref)
        if name is not None:
            raise RuntimeError(f"traced {what} disagrees with eager for {name!r} (data-dependent Python control "
                               "flow, or randomness such as dropout in training mode?)")


def _first_mismatch(names, got, ref):
    """The first tensor of ``got`` that differs from ``ref`` by more than rounding, or None.

    Errors are measured against the largest entry of the whole list (1e-4 of it in float32):
    a tensor whose true value is zero (a convolution bias before BatchNorm, the last bias
    before a spatial softmax) is rounding noise of long float32 sums in both, measured up to
    ~1.4e-5 of that entry, far above its own scale. A wrong trace differs by far more, and
    an error below that bound is negligible in the hypergradient.
    Non-finite entries must be the same (NaN where the reference has NaN, the same infinity);
    the error is over the finite ones (a NaN difference never passes as small)."""
    def finite_max(t):
        f = t[t.isfinite()]
        return float(f.abs().max()) if f.numel() else 0.0

    scale = max(max((finite_max(b) for b in ref if b.numel()), default=0.0), 1e-6)
    for name, a, b in zip(names, got, ref):
        if a.shape != b.shape:
            return name
        if not a.numel():
            continue
        tol = 1e-4 if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        fa, fb = a.isfinite(), b.isfinite()
        if not torch.equal(fa, fb):
            return name
        if not bool(fa.all()) and not torch.equal(a[~fa].nan_to_num(nan=0.0), b[~fb].nan_to_num(nan=0.0)):
            return name  # NaN (as 0) or an infinity (as the largest finite) in other places
        err = float((a[fa] - b[fb]).abs().max()) if bool(fa.any()) else 0.0
        if not err <= tol * scale + 1e-12:
            return name
    return None
