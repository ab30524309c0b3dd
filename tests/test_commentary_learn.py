"""The learning loops: BPTT options (truncation, checkpointing, fresh students),
the NaN policy, training a student with a saved commentary."""
import pytest
import torch
from torch import nn

from commentaries_ext.commentary import BatchError, Blending, NonFiniteError, TabularWeighting
from commentaries_ext.files import load_commentary, save_commentary
from commentaries_ext.learn import evaluate, learn_bptt, learn_ift, train_student


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, 4, generator=g) + torch.nn.functional.one_hot(y, 4).float() * 2, y


def _student():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _grad_after_one_outer(**kw):
    torch.manual_seed(0)
    c = TabularWeighting(24, reduction="sum")
    opt = torch.optim.SGD(c.parameters(), lr=1.0)
    before = c.logits.detach().clone()
    learn_bptt(c, _student, _data(), _data(seed=1), inner_steps=4, outer_steps=1, inner_optimizer="sgd",
               inner_lr=0.3, outer_optimizer=opt, batch_size=24, **kw)
    return before - c.logits.detach()  # = the hypergradient (SGD, lr 1)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")  # (torch.compile's imports)
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_students_learn_as_eager_ones(how):
    """learn_bptt and learn_ift differentiate the uncompiled student (compiled graphs have no
    double backward: learn_bptt with a torch.compile'd student failed in the outer backward).
    aot_eager: the same autograd as inductor's, without compiling C++."""
    def compiled():
        m = _student()
        if how == "torch.compile":
            return torch.compile(m, backend="aot_eager")
        m.compile(backend="aot_eager")
        return m

    for learn in ("bptt", "ift"):
        out = {}
        for name, factory in (("eager", _student), ("compiled", compiled)):
            torch.manual_seed(0)
            c = TabularWeighting(24, reduction="sum")
            if learn == "bptt":
                learn_bptt(c, factory, _data(), _data(seed=1), inner_steps=3, outer_steps=2, inner_optimizer="sgd",
                           inner_lr=0.3, outer_lr=0.1, batch_size=8)
            else:
                learn_ift(c, factory(), _data(), _data(seed=1), steps=3, batch_size=8, hyper_lr=0.1)
            out[name] = c.logits.detach().clone()
        assert not torch.equal(out["eager"], torch.zeros(24))
        torch.testing.assert_close(out["compiled"], out["eager"], rtol=1e-5, atol=1e-6)
    torch.compiler.reset()


def test_bptt_checkpointing_is_exact_and_truncation_differs():
    full = _grad_after_one_outer()
    ckpt = _grad_after_one_outer(checkpoint=2)
    torch.testing.assert_close(ckpt, full, rtol=1e-5, atol=1e-7)
    trunc = _grad_after_one_outer(truncate=1)
    assert float(trunc.abs().sum()) > 0 and not torch.allclose(trunc, full)


def test_bptt_checkpointing_updates_the_commentarys_running_statistics_once():
    """The backward re-runs checkpointed inner steps; a commentary with BatchNorm (the reference
    teacher) counted each step twice (num_batches_tracked 8 after 4 steps)."""
    from commentaries_ext.commentary import ExampleWeighting

    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 3
    runs = {}
    for ck in (None, 1, 3):
        torch.manual_seed(3)
        com = ExampleWeighting.reference((1, 4, 4), 3)
        learn_bptt(com, lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), (x, y), (x[:8], y[:8]), inner_steps=4,
                   outer_steps=1, batch_size=8, checkpoint=ck)
        runs[ck] = dict(com.named_buffers())
    assert int(runs[None]["net.features.1.num_batches_tracked"]) == 4
    for ck in (1, 3):
        for k, v in runs[None].items():
            torch.testing.assert_close(runs[ck][k], v, rtol=1e-6, atol=0, msg=lambda m, k=k: f"{ck} {k}: {m}")


@pytest.mark.parametrize("inner", ["adam", "momentum"])
def test_bptt_inner_optimizers_and_fresh_students(inner):
    c = Blending(3)
    r = learn_bptt(c, _student, _data(), _data(seed=1), inner_steps=3, outer_steps=2, inner_optimizer=inner,
                   inner_lr=0.1, outer_lr=0.1, same_init=False, val_batch_size=8)
    assert len(r.history) == 2 and all(h["val_loss"] > 0 for h in r.history)
    assert r.learned_with()["algorithm"] == "bptt"


def test_nan_policy_in_the_learning_loops():
    x, y = _data()
    c = TabularWeighting(24, reduction="sum")

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) * float("nan")

    with pytest.raises(NonFiniteError):
        learn_bptt(c, Exploding, (x, y), (x, y), inner_steps=2, outer_steps=1)
    r = learn_bptt(c, Exploding, (x, y), (x, y), inner_steps=2, outer_steps=2, nan_policy="skip")
    assert r.skipped_steps == 2 and bool(torch.isfinite(c.logits).all())
    r = learn_ift(c, Exploding(), (x, y), (x, y), steps=2, nan_policy="skip")
    assert r.info["skipped_student_steps"] == 2


def test_bad_arguments():
    x, y = _data()
    with pytest.raises(BatchError, match="val_data"):
        learn_bptt(Blending(3), _student, (x, y), (x, y + 5), inner_steps=1, outer_steps=1)
    with pytest.raises(BatchError, match="train_data must be a tuple"):
        learn_ift(Blending(3), _student(), x, (x, y))
    with pytest.raises(ValueError, match="inner_optimizer"):
        learn_bptt(Blending(3), _student, (x, y), (x, y), inner_steps=1, outer_steps=1, inner_optimizer="rmsprop")
    # each of these once failed deep inside (a missing forward argument, "does not require grad",
    # a TypeError naming no argument) or ran with another setting (randperm[:-3])
    with pytest.raises(TypeError, match="student_factory must be a function .* got Sequential"):
        learn_bptt(Blending(3), _student(), (x, y), (x, y), inner_steps=1, outer_steps=1)
    with pytest.raises(TypeError, match="student_factory\\(\\) must return an nn.Module"):
        learn_bptt(Blending(3), lambda: None, (x, y), (x, y), inner_steps=1, outer_steps=1)
    with pytest.raises(TypeError, match="learn_ift: student must be the student nn.Module, got function"):
        learn_ift(Blending(3), _student, (x, y), (x, y))
    import numpy as np

    learn_bptt(Blending(3), _student, (x, y), (x, y), inner_steps=np.int64(1), outer_steps=np.int64(1))  # a sweep's
    with pytest.raises(TypeError, match="learn_bptt: inner_steps must be an int"):
        learn_bptt(Blending(3), _student, (x, y), (x, y), inner_steps=2.5, outer_steps=1)
    with pytest.raises(ValueError, match="learn_bptt: truncate must be >= 1"):
        learn_bptt(Blending(3), _student, (x, y), (x, y), inner_steps=2, outer_steps=1, truncate=0)
    for fn, student in ((learn_bptt, _student), (learn_ift, _student())):
        with pytest.raises(ValueError, match="val_batch_size must be >= 1, got -3"):
            fn(Blending(3), student, (x, y), (x, y), val_batch_size=-3)
    # a commentary for other classes than the student's logits
    with pytest.raises(BatchError, match="Blending was made for 4 classes but the student outputs 3 logits"):
        learn_bptt(Blending(4), _student, (x, y), (x, y), inner_steps=1, outer_steps=1)
    with pytest.raises(BatchError, match="Blending was made for 4 classes but the student outputs 3 logits"):
        learn_ift(Blending(4), _student(), (x, y), (x, y), steps=1)


def test_reuse_a_saved_commentary_on_a_new_architecture(tmp_path):
    x, y = _data(48)
    c = Blending(3)
    learn_ift(c, _student(), (x, y), (x, y), steps=5, batch_size=8)
    path = save_commentary(tmp_path / "blend.commentary", c, data=(x, y), learned_with={"algorithm": "ift"})
    torch.manual_seed(0)
    new = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    c2 = load_commentary(path, data=(x, y), model=new)
    losses = train_student(new, (x, y), commentary=c2, steps=30, batch_size=16, lr=1e-2)
    assert len(losses) == 30 and losses[-1] < losses[0]
    ev = evaluate(new, (x, y))
    assert 0 <= ev["accuracy"] <= 1 and ev["loss"] > 0


def test_the_batch_index_lives_with_the_batch():
    """Data already on an accelerator (device=None): x[idx] lands there, and so must the index
    the commentary reads (it was left on the CPU). A meta-device stand-in for the GPU."""
    from commentaries_ext.learn import _draw_batch

    x, y = torch.randn(10, 4, device="meta"), torch.zeros(10, dtype=torch.long, device="meta")
    xb, yb, idx = _draw_batch(x, y, 4, torch.Generator().manual_seed(0), None)
    assert xb.device.type == yb.device.type == idx.device.type == "meta"
    xb, yb, idx = _draw_batch(*_data(), 4, torch.Generator().manual_seed(0), None)
    assert idx.device.type == "cpu" and torch.equal(xb, _data()[0][idx])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_learning_loops_on_a_gpu():
    """device="cuda" moves the commentary with the student (its tables and nets were left on the
    CPU), data already on the GPU with device=None works (the index follows the batch), and a
    CUDA generator drives the commentary's draws."""
    x, y = _data()
    c = TabularWeighting(24, reduction="sum")
    learn_ift(c, _student(), (x, y), (x, y), steps=2, batch_size=8, device="cuda")
    assert c.logits.device.type == "cuda"
    c2 = TabularWeighting(24, reduction="sum").cuda()
    learn_ift(c2, _student().cuda(), (x.cuda(), y.cuda()), (x.cuda(), y.cuda()), steps=2, batch_size=8)
    b = Blending(3)
    losses = train_student(_student(), (x, y), commentary=b, steps=3, batch_size=8, device="cuda")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    batch = b.prepare(x.cuda(), y.cuda())
    b._draw(batch, torch.Generator("cuda").manual_seed(0))
    assert batch["perm"].device.type == "cuda"
