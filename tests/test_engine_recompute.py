"""engine/recompute.py: saved tensors kept as recipes and recomputed by the backward -- the
gradients are unchanged (bit for bit through unroll on a ConvNet), a recipe is re-run only
once its step's context has closed, in-place changes to its inputs are caught, and small
tensors are left alone."""
import contextlib
import gc
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commentaries_ext.engine import Adam, FunctionalModule, unroll
from commentaries_ext.engine import recompute
from commentaries_ext.engine.recompute import recompute_cheap

_unroll_module = sys.modules["commentaries_ext.engine.unroll"]


def _counted(fn, calls):
    def run(*a):
        calls.append(1)
        return fn(*a)
    return run


def test_registered_tensor_is_recomputed_after_the_context_closes():
    a = torch.randn(300, 300, dtype=torch.float64, requires_grad=True)  # 720 KB: above MIN_BYTES
    calls = []
    with recompute_cheap():
        b = a.detach() * 2
        recompute.register(b, _counted(lambda x: x * 2, calls), a.detach())
        b.requires_grad_(True)
        c = b.sin()  # keeps b: as its recipe
        gb, = torch.autograd.grad(c.sum(), b, retain_graph=True)  # within the context: the held value
        assert calls == []
    del b
    # after the context, reading the saved tensor recomputes it
    saved = c.grad_fn._saved_self
    assert calls == [1]
    assert torch.equal(saved, a.detach() * 2)
    assert torch.equal(gb, torch.cos(a.detach() * 2))


def test_a_value_saved_by_two_nodes_is_recomputed_once_and_freed_with_them():
    a = torch.randn(300, 300, dtype=torch.float64)
    calls = []
    with recompute_cheap():
        b = (a * 2).requires_grad_(True)
        recompute.register(b, _counted(lambda x: x * 2, calls), a)
        c, d = b.sin(), b.cos()  # two nodes keep b, both as its recipe
    del b
    (c + d).sum().backward()  # each node reads b
    assert calls == [1]
    # the nodes released their saved tensors after running: no recipe holds the value any more
    gc.collect()
    assert not [r for r in gc.get_objects() if isinstance(r, recompute._Recipe) and r.held is not None
                and r.held.shape == a.shape and torch.equal(r.held, a * 2)]


def test_inplace_change_of_a_recipe_input_raises():
    a = torch.randn(300, 300, dtype=torch.float64)
    with recompute_cheap():
        b = (a * 2).requires_grad_(True)
        recompute.register(b, lambda x: x * 2, a)
        c = b.sin()
    del b
    a.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        c.sum().backward()


def test_small_tensors_and_outside_the_context_are_kept():
    calls = []
    small = torch.randn(10, 10)
    with recompute_cheap():
        b = (small * 2).requires_grad_(True)
        recompute.register(b, _counted(lambda x: x * 2, calls), small)
        c = b.sin()
    big = torch.randn(300, 300, dtype=torch.float64)
    b2 = (big * 2).requires_grad_(True)
    recompute.register(b2, _counted(lambda x: x * 2, calls), big)  # no context: a no-op
    c2 = b2.sin()
    assert not recompute.active()
    c.sum().backward()
    c2.sum().backward()
    assert calls == []


def _convnet_problem():
    torch.manual_seed(0)
    # a first convolution cheap to recompute (1 input channel, 5x5) with an output above MIN_BYTES
    net = nn.Sequential(nn.Conv2d(1, 16, 5, 1, 2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2),
                        nn.Conv2d(16, 8, 3, 2, 1), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).train()
    fm = FunctionalModule(net)
    batches = [(torch.randn(16, 1, 32, 32), torch.randint(0, 5, (16,))) for _ in range(3)]
    phi = torch.zeros(16, requires_grad=True)  # per-example log-weights

    def loss_fn(p, buf, h, b):
        out, nb = fm.call_update(p, buf, b[0] * (1 + 0.1 * torch.tanh(h["phi"])).view(-1, 1, 1, 1))
        w = torch.softmax(h["phi"], 0) * len(b[1])
        return (w * F.cross_entropy(out, b[1], reduction="none")).mean(), nb

    def meta_grad():
        res = unroll(loss_fn, fm.params(), Adam(lr=1e-2), batches, hparams={"phi": phi}, buffers=fm.buffers())
        val = F.cross_entropy(fm(res.params, batches[0][0]), batches[0][1])
        return torch.autograd.grad(val, phi)[0]

    return meta_grad


def test_unroll_meta_gradient_is_bit_identical_with_recipes(monkeypatch):
    meta_grad = _convnet_problem()
    packed = []
    pack = recompute._pack

    def counting_pack(t):
        r = pack(t)
        if r is not t:
            packed.append(tuple(t.shape))
        return r

    monkeypatch.setattr(recompute, "_pack", counting_pack)
    with_recipes = meta_grad()
    assert packed, "no saved tensor was kept as a recipe"
    assert (16, 16, 32, 32) in packed  # the ReLU-masked pool gradient (and the conv output where the rule runs)
    monkeypatch.setattr(_unroll_module, "recompute_cheap", contextlib.nullcontext)
    without = meta_grad()
    assert torch.isfinite(without).all() and without.abs().sum() > 0
    assert torch.equal(with_recipes, without)


def test_mlp_weight_gradients_kept_as_recipes_match_the_stock_graph(monkeypatch):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(300, 256), nn.ReLU(), nn.Linear(256, 3)).double()  # 600 KB weight
    fm = FunctionalModule(net)
    batches = [(torch.randn(8, 300, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(3)]
    phi = torch.zeros(8, dtype=torch.float64, requires_grad=True)

    def loss_fn(p, buf, h, b):
        out = fm(p, b[0] * (1 + 0.1 * torch.tanh(h["phi"])).view(-1, 1))
        return (torch.softmax(h["phi"], 0) * F.cross_entropy(out, b[1], reduction="none")).sum(), {}

    def meta_grad():
        res = unroll(loss_fn, fm.params(), Adam(lr=1e-2), batches, hparams={"phi": phi})
        return torch.autograd.grad(F.cross_entropy(fm(res.params, batches[0][0]), batches[0][1]), phi)[0]

    packed = []
    pack = recompute._pack
    monkeypatch.setattr(recompute, "_pack", lambda t: (lambda r: (packed.append(tuple(t.shape)) if r is not t else None) or r)(pack(t)))
    with_recipes = meta_grad()
    assert (256, 300) in packed  # the first layer's weight gradient, kept by the Adam step as its recipe
    monkeypatch.setattr(_unroll_module, "recompute_cheap", contextlib.nullcontext)
    without = meta_grad()
    assert without.abs().sum() > 0
    torch.testing.assert_close(with_recipes, without, rtol=1e-12, atol=1e-15)


def test_a_backward_on_another_thread_registers_with_the_open_context():
    """A GPU backward runs on autograd's device threads, not on the thread that opened the
    context: a rule's registration from such a thread reaches the one open context (a
    threading.local registry dropped it, and the memory saving with it); with contexts open on
    two threads, a third thread has none to pick and registers nothing."""
    import threading

    a = torch.randn(300, 300, dtype=torch.float64)  # above MIN_BYTES

    def on_thread(fn):
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    def register_and_look_up():
        b = a * 2
        recompute.register(b, lambda x: x * 2, a)
        return recompute.active(), recompute._lookup(b) is not None

    assert on_thread(register_and_look_up) == (False, False)
    with recompute_cheap():
        assert on_thread(register_and_look_up) == (True, True)
        opened, closed = threading.Event(), threading.Event()

        def other_context():
            with recompute_cheap():
                opened.set()
                closed.wait(10)

        t = threading.Thread(target=other_context)
        t.start()
        opened.wait(10)
        try:
            assert on_thread(register_and_look_up) == (False, False)
        finally:
            closed.set()
            t.join()
        assert on_thread(register_and_look_up) == (True, True)
    assert not recompute.active() and recompute._stacks == {}
