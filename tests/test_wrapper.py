"""The drop-in optimizer wrapper: identical to the plain loop when off, hyper-steps
every k steps, torch.optim state dicts, AMP, the NaN policy."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commentaries_ext.commentary import Blending, ExampleWeighting, NonFiniteError, TabularWeighting
from commentaries_ext.commentary.base import BatchError
from commentaries_ext.engine import CGConfig
from commentaries_ext.wrapper import CommentaryOptimizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _batches(x, y, bs=8):
    for i in range(0, x.shape[0], bs):
        yield x[i:i + bs], y[i:i + bs], torch.arange(i, min(i + bs, x.shape[0]))


@pytest.mark.parametrize("commentary", [None, "weighting"])
def test_off_is_identical_to_the_plain_loop(commentary):
    x, y = _data()
    plain, wrapped = _model(), _model()
    opt1 = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt2 = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sch1 = torch.optim.lr_scheduler.StepLR(opt1, 2, 0.5)
    sch2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    com = ExampleWeighting.reference((1, 4, 4), 3) if commentary else None
    teacher = CommentaryOptimizer(opt2, wrapped, com, enabled=False, val_loader=[(x, y)])
    for xb, yb, _ in _batches(x, y):
        opt1.zero_grad()
        F.cross_entropy(plain(xb), yb).backward()
        opt1.step()
        sch1.step()
        teacher.zero_grad()
        teacher.loss(xb, yb).backward()
        teacher.step()
        sch2.step()
    for a, b in zip(plain.state_dict().values(), wrapped.state_dict().values()):
        assert torch.equal(a, b)
    assert teacher.hyper_steps == 0 and teacher.steps == 6


def test_fixed_commentary_without_blending_matches_plain_ce():
    x, y = _data()
    plain, wrapped = _model(), _model()
    opt1 = torch.optim.Adam(plain.parameters(), lr=1e-2)
    opt2 = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    teacher = CommentaryOptimizer(opt2, wrapped, Blending(3, policy="none"), hyper_every=0)
    for xb, yb, _ in _batches(x, y):
        opt1.zero_grad()
        F.cross_entropy(plain(xb), yb).backward()
        opt1.step()
        teacher.zero_grad()
        teacher.loss(xb, yb).backward()
        teacher.step()
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hyper_steps_every_k_and_state_dicts():
    x, y = _data()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    com = TabularWeighting(x.shape[0], num_classes=3, reduction="sum")
    teacher = CommentaryOptimizer(opt, model, com, val_loader=[(x[:16], y[:16]), (x[16:32], y[16:32])], hyper_every=2)
    before = com.logits.detach().clone()
    for xb, yb, idx in _batches(x, y):
        teacher.zero_grad()
        teacher.loss(xb, yb, index=idx).backward()
        teacher.step()
    assert teacher.steps == 6 and teacher.hyper_steps == 3
    assert not torch.equal(before, com.logits.detach())
    assert teacher.last_hyper is not None and set(teacher.last_hyper.grads) == {"logits"}
    # the student's optimizer state dict is a plain torch.optim one
    fresh = torch.optim.Adam(_model().parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # the wrapper's state round-trips
    sd = copy.deepcopy(teacher.state_dict())
    model2 = _model()
    com2 = TabularWeighting(x.shape[0], num_classes=3, reduction="sum")
    t2 = CommentaryOptimizer(torch.optim.Adam(model2.parameters(), lr=1e-2), model2, com2, val_loader=[(x, y)])
    t2.load_state_dict(sd)
    assert t2.steps == 6 and t2.hyper_steps == 3 and torch.equal(com2.logits, com.logits)
    assert t2.hyper_optimizer.state_dict()["state"][0]["step"] == teacher.hyper_optimizer.state_dict()["state"][0]["step"]
    assert t2.param_groups is t2.optimizer.param_groups


@pytest.mark.filterwarnings("ignore::commentaries_ext.engine.HypergradientDivergenceWarning")
def test_hyper_step_uses_the_engine_settings():
    x, y = _data()
    model = _model()
    com = Blending(3)
    teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, val_loader=[(x, y)],
                                  solver=CGConfig(max_iter=3), hyper_every=1)
    teacher.zero_grad()
    teacher.loss(x[:8], y[:8]).backward()
    teacher.step()
    assert teacher.last_hyper.info["solver"] == "cg"
    teacher.solver = None  # the reference default: Neumann K=1, alpha = the student's lr
    res = teacher.hyper_step()
    assert res.info["solver"] == "neumann" and res.info["alpha"] == pytest.approx(0.05)


@pytest.mark.parametrize("lrs", [(0.05, 0.01), (0.05, 0.05)])
def test_alpha_is_the_first_groups_lr_with_a_warning_once_when_they_differ(lrs):
    import warnings

    x, y = _data()
    model = _model()
    groups = [{"params": model[1].parameters(), "lr": lrs[0]}, {"params": model[2:].parameters(), "lr": lrs[1]}]
    teacher = CommentaryOptimizer(torch.optim.SGD(groups), model, Blending(3), val_loader=[(x, y)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for xb, yb, _ in list(_batches(x, y))[:3]:
            teacher.zero_grad()
            teacher.loss(xb, yb).backward()
            teacher.step()
    assert teacher.hyper_steps == 3 and teacher.last_hyper.info["alpha"] == pytest.approx(0.05)
    ours = [w for w in caught if "different learning rates" in str(w.message)]
    assert len(ours) == (1 if lrs[0] != lrs[1] else 0)
    if ours:
        assert "[0.05, 0.01]" in str(ours[0].message) and ours[0].filename == __file__


def test_amp_autocast_and_grad_scaler():
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    com = ExampleWeighting.reference((1, 4, 4), 3, reduction="mean")
    teacher = CommentaryOptimizer(opt, model, com, val_loader=[(x, y)], hyper_every=2, scaler=scaler,
                                  hvp="forward_over_reverse")
    before = [p.detach().clone() for p in com.parameters()]
    for xb, yb, _ in _batches(x, y):
        teacher.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = teacher.loss(xb, yb)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        teacher.step()
    assert teacher.hyper_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, com.parameters()))
    assert teacher.last_hyper.info["hvp"] == "ForwardOverReverseHessian"  # the teacher's BatchNorm is no obstacle


def test_nan_policy():
    x, y = _data()
    bad = x[:8].clone()
    bad[0, 0, 0, 0] = float("nan")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = CommentaryOptimizer(opt, model, Blending(3), val_loader=[(x, y)])
    with pytest.raises(NonFiniteError, match="NaN"):
        teacher.loss(bad, y[:8])
    # skipped: the student and the commentary (the reference teacher has BatchNorm) as before the
    # batch, running statistics included (they became NaN and stayed so)
    com = ExampleWeighting.reference((1, 4, 4), 3, reduction="mean")
    teacher = CommentaryOptimizer(opt, model, com, val_loader=[(x, y)], nan_policy="skip")
    snap, snap_com = copy.deepcopy(model.state_dict()), copy.deepcopy(com.state_dict())
    teacher.zero_grad()
    loss = teacher.loss(bad, y[:8])
    loss.backward()
    assert teacher.step() is None
    assert teacher.skipped_steps == 1 and teacher.steps == 0 and teacher.hyper_steps == 0
    for now, before in ((model.state_dict(), snap), (com.state_dict(), snap_com)):
        assert set(now) == set(before)
        for k, v in now.items():
            assert torch.equal(v, before[k]), k
    teacher.zero_grad()
    teacher.loss(x[:8], y[:8]).backward()
    teacher.step()
    assert teacher.steps == 1 and teacher.hyper_steps == 1


def test_nan_policy_skip_with_gradient_accumulation_restores_the_first_batch_state():
    """Two loss() calls per step (gradient accumulation), the NaN in the first: the skipped step
    restores the buffers as they were before it, not before the second micro-batch."""
    x, y = _data()
    bad = x[:8].clone()
    bad[0, 0, 0, 0] = float("nan")
    model = _model()
    com = ExampleWeighting.reference((1, 4, 4), 3, reduction="mean")
    teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, com, val_loader=[(x, y)],
                                  nan_policy="skip")
    snap, snap_com = copy.deepcopy(model.state_dict()), copy.deepcopy(com.state_dict())
    teacher.zero_grad()
    teacher.loss(bad, y[:8]).backward()
    teacher.loss(x[8:16], y[8:16]).backward()
    assert teacher.step() is None and teacher.skipped_steps == 1
    for now, before in ((model.state_dict(), snap), (com.state_dict(), snap_com)):
        for k, v in now.items():
            assert torch.equal(v, before[k]), k


def test_errors():
    model = _model()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        CommentaryOptimizer(object(), model, None)
    with pytest.raises(ValueError, match="nan_policy"):
        CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, None, nan_policy="ignore")
    # as learn_ift/learn_bptt: not a silent one-process run
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
        CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, Blending(3), distributed=True)
    x, y = _data()
    t = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, Blending(3))
    t.loss(x[:8], y[:8]).backward()
    with pytest.raises(ValueError, match="val_loader"):
        t.step()


def test_readme_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using a commentary in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x_train, y_train = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    env = {
        "x_train": x_train, "y_train": y_train, "x_val": x_train, "y_val": y_train, "steps": 3,
        "train_loader": [(x_train[i:i + 8], y_train[i:i + 8]) for i in range(0, 24, 8)],
        "val_loader": [(x_train[:8], y_train[:8])],
        "model": nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
        "new_model": nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)),
    }
    exec(compile(code, "README.md", "exec"), env)
    assert env["teacher"].steps == 3 and (tmp_path / "fmnist.commentary").exists()


def test_readme_loop_with_sgd_trains_under_the_default_reduction():
    # the README's recipe (default ExampleWeighting, SGD lr 0.05 momentum 0.9): with the old "sum"
    # default the step was batch-size times larger and the student stayed near chance
    g = torch.Generator().manual_seed(0)

    def data(n):  # a class-coded bright pixel on noise
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.5 * torch.rand(n, 1, 12, 12, generator=g)
        x[torch.arange(n), 0, y, y] += 1.0
        return x, y

    (x, y), (xv, yv) = data(512), data(64)
    torch.manual_seed(0)
    from commentaries_ext.models import make_student

    model, steps = make_student("convnet", (1, 12, 12), 10), 40
    commentary = ExampleWeighting.reference((1, 12, 12), num_classes=10)
    assert commentary.reduction == "mean"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    teacher = CommentaryOptimizer(optimizer, model, commentary, val_loader=[(xv, yv)], hyper_every=10,
                                  total_steps=steps)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=g)[:32]
        teacher.zero_grad()
        loss = teacher.loss(x[idx], y[idx])
        loss.backward()
        teacher.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    assert teacher.hyper_steps == 4
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    model.eval()
    with torch.no_grad():
        assert float((model(xv).argmax(1) == yv).float().mean()) > 0.8


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")  # (torch.compile's imports)
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_student(how):
    # the hyper-step differentiates the uncompiled module (compiled graphs have no double backward);
    # the user's training forward stays compiled
    x, y = _data()
    hyper = {}
    for name in ("eager", "compiled"):
        model = _model()
        student = model
        if name == "compiled":
            if how == "torch.compile":
                student = torch.compile(model)
            else:
                model.compile()
        teacher = CommentaryOptimizer(torch.optim.SGD(student.parameters(), lr=0.05), student, Blending(3),
                                      val_loader=[(x, y)], generator=torch.Generator().manual_seed(0))
        for xb, yb, _ in list(_batches(x, y))[:2]:
            teacher.zero_grad()
            teacher.loss(xb, yb).backward()
            teacher.step()
        assert teacher.hyper_steps == 2
        hyper[name] = teacher.last_hyper.grads["phi"]
    assert (student is not model) if how == "torch.compile" else model._compiled_call_impl is not None
    torch.testing.assert_close(hyper["compiled"], hyper["eager"], rtol=1e-4, atol=1e-6)
    torch.compiler.reset()


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")
def test_a_submodule_compiled_after_the_first_hyper_step():
    """module.compile() after a warm-up: the next hyper-step runs it eagerly too (the compiled
    submodules were looked for once, at the first hyper-step, and the second failed in the double
    backward)."""
    x, y = _data(32, seed=4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, TabularWeighting(32),
                                  val_loader=[(x, y)], hyper_lr=0.1)
    for i in range(2):
        teacher.zero_grad()
        teacher.loss(x[:8], y[:8], index=torch.arange(8)).backward()
        teacher.step()
        if i == 0:
            model[1].compile(backend="aot_eager")
    assert teacher.hyper_steps == 2 and model[1]._compiled_call_impl is not None
    torch.compiler.reset()


def test_fresh_training_batch_for_the_hyper_step():
    x, y = _data()
    model = _model()
    com = TabularWeighting(x.shape[0], reduction="sum")
    loader = [(x[i:i + 8], y[i:i + 8], torch.arange(i, i + 8)) for i in range(24, 48, 8)]
    teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, val_loader=[(x, y)],
                                  hyper_train_loader=loader)
    teacher.zero_grad()
    teacher.loss(x[:8], y[:8], index=torch.arange(8)).backward()
    teacher.step()
    g = teacher.last_hyper.grads["logits"]
    # g_T was taken on examples 24..31, so only their weights get a hypergradient
    assert float(g[:24].abs().sum()) == 0 and float(g[24:32].abs().sum()) > 0


def test_ddp_single_process_gloo(tmp_path):
    import torch.distributed as dist

    # the pinned torch builds ship torch.distributed; the wrapper's DDP support needs it
    assert dist.is_available(), "torch.distributed is unavailable in this torch build"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        x, y = _data()
        model = nn.parallel.DistributedDataParallel(_model())
        com = Blending(3)
        teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, val_loader=[(x, y)])
        assert teacher._dist()
        for xb, yb, _ in _batches(x, y):
            teacher.zero_grad()
            teacher.loss(xb, yb).backward()
            teacher.step()
        assert teacher.hyper_steps == 6 and not bool((com.phi == -1).all())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make", [lambda: Blending(3),
                                  lambda: ExampleWeighting.reference((1, 4, 4), 3, reduction="sum"),
                                  lambda: TabularWeighting(48, reduction="sum")])
def test_cuda_amp(make):
    x, y = _data()
    x, y = x.cuda(), y.cuda()
    model = _model().cuda()
    com = make().cuda()
    scaler = torch.amp.GradScaler("cuda")
    teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com,
                                  val_loader=[(x, y)], hyper_every=2, scaler=scaler)
    for xb, yb, idx in _batches(x, y):
        teacher.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = teacher.loss(xb, yb, index=idx.cuda())
        scaler.scale(loss).backward()
        teacher.step()
    assert teacher.hyper_steps == 3
    assert all(bool(torch.isfinite(p).all()) for p in list(model.parameters()) + list(com.parameters()))


@pytest.mark.parametrize("kind", ["blending", "weighting", "tabular", "mask"])
def test_gauss_newton_curvature_for_every_commentary(kind):
    """curvature="gauss_newton" was accepted and then failed at the first hyper-step (the wrapper's
    training loss was no SplitLoss). With a student whose logits are linear in its parameters the
    Gauss-Newton matrix is the Hessian, so both give the same hypergradient (float64, CG to 1e-12)."""
    from commentaries_ext.commentary import AttentionMask

    x, y = _data(24, seed=3)
    x, y = x.double(), y
    grads = {}
    for curvature in ("hessian", "gauss_newton"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
        com = {"blending": lambda: Blending(3), "tabular": lambda: TabularWeighting(24),
               "weighting": lambda: ExampleWeighting(nn.Sequential(nn.Flatten(), nn.Linear(16, 1)), call="x",
                                                     num_classes=3),
               "mask": lambda: AttentionMask(1, num_classes=3, width=4)}[kind]().double()
        teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, com, val_loader=[(x, y)],
                                      curvature=curvature, solver=CGConfig(max_iter=60, tol=1e-12, damping=1e-2),
                                      generator=torch.Generator().manual_seed(0))
        teacher.zero_grad()
        teacher.loss(x[:8], y[:8], index=torch.arange(8)).backward()
        teacher.step()
        grads[curvature] = teacher.last_hyper.grads
        assert (teacher.last_hyper.info["hvp"] == "GaussNewton") == (curvature == "gauss_newton")
    assert grads["hessian"].keys() == grads["gauss_newton"].keys()
    assert any(g.abs().max() > 0 for g in grads["hessian"].values())
    for k, g in grads["hessian"].items():
        torch.testing.assert_close(grads["gauss_newton"][k], g, rtol=1e-6, atol=1e-9)


def test_dropout_student_hyper_step_is_that_of_dropout_at_its_expectation():
    # Dropout in training mode made each evaluation of the training loss inside the hyper-step
    # draw its own masks; the hyper-step now runs it in eval mode (identity), training does not
    x, y = _data()

    def student(dropout):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Dropout(0.5) if dropout else nn.Identity(),
                             nn.Linear(8, 3))

    grads = []
    for dropout in (True, False):
        model = student(dropout)
        torch.manual_seed(1)
        com = ExampleWeighting.reference((1, 4, 4), num_classes=3)
        teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, val_loader=[(x, y)],
                                      hyper_every=0)
        res = teacher.hyper_step(train_batch=com.prepare(x[:8], y[:8], progress=0.0), val_batch=(x[8:16], y[8:16]))
        grads.append(res.grads)
        assert model.training and all(m.training for m in model.modules())
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7), k


def test_a_student_with_multihead_attention_dropout_takes_hyper_steps():
    # the attention dropout drew random numbers in the hyper-step (refused), and in eval mode the
    # module's fast path has no forward-mode formula (the weighted mixed term's jvp)
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True), \
                nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x.view(x.shape[0], 4, 4))
            return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))

    x, y = _data()
    torch.manual_seed(0)
    model = Attn()
    com = ExampleWeighting.reference((1, 4, 4), num_classes=3)
    t = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, val_loader=[(x, y)])
    for i in range(2):
        t.zero_grad()
        t.loss(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]).backward()
        t.step()
    assert t.hyper_steps == 2 and model.attn.training
    assert all(torch.isfinite(g).all() for g in t.last_hyper.grads.values())


def test_validation_batches_are_checked_like_training_batches():
    # they were used as given: float labels truncated by .long(), out-of-range or one-hot labels
    # failing inside torch, an empty batch reported as a NaN loss, dict keys as a bare KeyError
    x, y = _data()
    model = _model()
    t = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, Blending(3), hyper_every=0)
    t.loss(x[:8], y[:8]).backward()
    t.step()
    for val, msg in [((x[:8], y[:8].float()), "y must hold integer class indices"),
                     ((x[:8], F.one_hot(y[:8], 3)), r"y must have shape \[8\]"),
                     ((x[:8], y[:8] + 3), "label 5 out of range"),
                     ((x[:0], y[:0]), "empty batch"),
                     ({"inputs": x[:8], "y": y[:8]}, r"needs the keys 'x' and 'y'; it has no \['x'\]")]:
        with pytest.raises(BatchError, match=msg):
            t.hyper_step(val_batch=val)
    assert t.hyper_steps == 0


def test_a_commentary_for_other_classes_is_refused():
    x, y = _data()
    model = _model()  # 3 logits
    for com in (Blending(10), ExampleWeighting.reference((1, 4, 4), num_classes=10)):
        t = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, hyper_every=0)
        with pytest.raises(BatchError, match="made for 10 classes but the student outputs 3 logits"):
            t.loss(x[:8], y[:8])


def test_step_needs_this_steps_loss_and_the_models_optimizer():
    x, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    t = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, Blending(3), val_loader=[(x, y)])
    F.cross_entropy(model(x[:8]), y[:8]).backward()  # the user's own loss: the commentary not applied
    with pytest.raises(RuntimeError, match=r"step\(\) without this step's loss"):
        t.step()
    assert t.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    t.zero_grad()
    t.loss(x[:8], y[:8]).backward()
    t.step()
    F.cross_entropy(model(x[:8]), y[:8]).backward()  # a later step would reuse the first batch
    with pytest.raises(RuntimeError, match=r"step\(\) without this step's loss"):
        t.step()
    with pytest.raises(ValueError, match="optimizer holds none of model's parameters"):
        CommentaryOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), model, Blending(3))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_hyper_step_that_makes_the_commentary_non_finite_is_undone(policy):
    # Adam on float16 commentary parameters: eps=1e-8 is 0 in float16, and its first step 0/0 = NaN
    # for every entry whose gradient is 0, after which every student step was non-finite
    x, y = _data()
    model = _model()
    com = Blending(3).half()
    t = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, com, val_loader=[(x, y)],
                            nan_policy=policy, hyper_every=0)
    phi0 = com.phi.detach().clone()
    t.loss(x[:8], y[:8]).backward()
    t.step()
    grads = {"phi": torch.zeros_like(com.phi, dtype=torch.float32)}
    res = type("R", (), {"grads": grads, "info": {}})()  # a hypergradient of zeros (finite)
    t.hypergradient = lambda *a, **k: res
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="made the commentary's parameters .*torch.float16.* non-finite"):
            t.hyper_step()
    else:
        t.hyper_step()
        assert t.skipped_hyper_steps == 1 and t.hyper_steps == 0
    assert torch.equal(com.phi, phi0)
