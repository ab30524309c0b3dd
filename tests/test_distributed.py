"""Several processes: two ranks (gloo on CPU, spawned once for the module) against
one process on the union of their shards, in float64.

* engine: the IFT hypergradient with ``reduce=ShardReducer`` equals the
  single-process one on the concatenated shards (Neumann K >= 2 with fixed and
  power-iteration alpha, CG, double-backward and forward-over-reverse HVPs,
  Gauss-Newton; example weighting with ``"sum"`` and ``"mean"`` -- the latter
  with shards of different sizes -- and blending), is bit-identical on both
  ranks, and differs from combining each rank's own hypergradient (the old
  final-average);
* wrapper: several hyper-steps with a DDP-wrapped student keep the commentary
  bit-identical across ranks and equal to the single-process run;
* learn_bptt: the meta-gradient of every outer step equals the single-process
  one on the union of the shards (each rank takes half of each global batch);
* learn_ift (a plain student, gradients averaged by learn_ift): the commentary
  and the student equal the single-process run on the global batches.
* the reference teacher's BatchNorm buffers, updated from each rank's shard, are
  rank 0's on every rank after the wrapper's steps, learn_ift and learn_bptt;
* nan_policy decides alike on every rank when only one rank sees a NaN.

The students have no BatchNorm: in training mode each rank would normalise with
its shard's statistics, which is not the union's (see commentaries_ext.distributed).
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from commentaries_ext import distributed as D
from commentaries_ext.commentary import Blending, ExampleWeighting, NonFiniteError, train_loss_fn, val_loss_fn
from commentaries_ext.commentary.base import per_example_ce
from commentaries_ext.engine import (
    CGConfig,
    FunctionalModule,
    HypergradientDivergenceWarning,
    NeumannConfig,
    SplitLoss,
    conjugate_gradient,
    implicit_hypergradient,
    neumann,
    power_iteration,
)
from commentaries_ext.engine import vector as V
from commentaries_ext.learn import learn_bptt, learn_ift
from commentaries_ext.wrapper import CommentaryOptimizer

WORLD = 2
D_IN, HID, C = 6, 5, 3
RTOL = 1e-6

# The tiny students' Hessians are indefinite: some cases take the Neumann fallback on purpose.
pytestmark = pytest.mark.filterwarnings(f"ignore::{HypergradientDivergenceWarning.__module__}."
                                        f"{HypergradientDivergenceWarning.__name__}")


# --------------------------------------------------------------------------- shared builders


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    return x, y


def _student(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HID), nn.Tanh(), nn.Linear(HID, C)).double()


def _weighting(seed, reduction):
    torch.manual_seed(seed)
    return ExampleWeighting(nn.Linear(D_IN, 1).double(), call="x", num_classes=C, reduction=reduction)


def _blending(seed):
    torch.manual_seed(seed)
    b = Blending(C).double()
    with torch.no_grad():
        b.phi.copy_(torch.randn(C, C, dtype=torch.float64))
    return b


class _GaussNewtonCase:
    """A SplitLoss (for curvature='gauss_newton') with its own hparams: per-example
    weights sigmoid(x . w), mean-reduced."""

    def __init__(self, fm):
        self.fm = fm

    def loss(self):
        def outputs(params, hparams, batch):
            return self.fm(params, batch["x"])

        def head(z, hparams, batch):
            w = torch.sigmoid(batch["x"] @ hparams["w"])
            return (w * per_example_ce(z, batch["y"])).mean()

        return SplitLoss(outputs, head)

    @staticmethod
    def hparams():
        g = torch.Generator().manual_seed(5)
        return {"w": torch.randn(D_IN, generator=g, dtype=torch.float64)}


# name -> (commentary kind, solver, hvp, curvature, train shard sizes, val shard sizes)
ENGINE_CASES = {
    "weight_sum_neumann3": ("weight_sum", NeumannConfig(K=3, alpha=0.05), "auto", "hessian", (8, 8), (6, 6)),
    "weight_mean_cg_unequal": ("weight_mean", CGConfig(max_iter=6, damping=0.5), "double_backward", "hessian",
                               (10, 6), (5, 9)),
    "weight_sum_neumann_power_fallback": ("weight_sum", NeumannConfig(K=4, alpha=None, damping=0.2), "double_backward",
                                 "hessian", (8, 8), (6, 6)),
    "blend_neumann2_db": ("blend", NeumannConfig(K=2, alpha=0.1), "double_backward", "hessian", (8, 8), (6, 6)),
    "blend_cg_for": ("blend", CGConfig(max_iter=5, damping=0.5), "forward_over_reverse", "hessian", (6, 6), (6, 6)),
    "gn_cg": ("gn", CGConfig(max_iter=6, damping=1e-2), "auto", "gauss_newton", (8, 8), (6, 6)),
    # a validation batch smaller than the world: rank 1's shard is empty (its mean loss is NaN)
    "weight_mean_cg_empty_val_shard": ("weight_mean", CGConfig(max_iter=6, damping=0.5), "double_backward",
                                       "hessian", (10, 6), (5, 0)),
}


def _engine_setup(kind):
    """(train_loss, val_loss, params, hparams, commentary or None) -- the same on every process."""
    student = _student(11)
    fm = FunctionalModule(student)
    if kind == "gn":
        case = _GaussNewtonCase(fm)
        return case.loss(), val_loss_fn(fm), fm.params(), case.hparams(), None
    com = _blending(12) if kind == "blend" else _weighting(12, "sum" if kind == "weight_sum" else "mean")
    return train_loss_fn(com, fm), val_loss_fn(fm), fm.params(), com.hparams(), com


def _engine_shards(name, r):
    """Rank ``r``'s (train_batch, val_batch) of an engine case (prepared deterministically)."""
    kind, _, _, _, tsizes, vsizes = ENGINE_CASES[name]
    xt, yt = _data(sum(tsizes), 21)
    xv, yv = _data(sum(vsizes), 22)
    t0, v0 = sum(tsizes[:r]), sum(vsizes[:r])
    xs, ys = xt[t0:t0 + tsizes[r]], yt[t0:t0 + tsizes[r]]
    val = {"x": xv[v0:v0 + vsizes[r]], "y": yv[v0:v0 + vsizes[r]]}
    _, _, _, _, com = _engine_setup(kind)
    if com is None:
        return {"x": xs, "y": ys}, val
    gen = torch.Generator().manual_seed(100 + r)
    return com.prepare(xs, ys, progress=0.3, generator=gen), val


def _union(batches):
    """The concatenation of prepared shard batches (blending partners offset into the union)."""
    out, off = {}, 0
    parts = {k: [] for k in batches[0]}
    for b in batches:
        for k, v in b.items():
            parts[k].append(v + off if k == "perm" else v)
        off += b["x"].shape[0]
    for k, vs in parts.items():
        out[k] = torch.cat(vs)
    return out


# wrapper scenario
W_STEPS, W_BATCH, W_VAL = 4, 8, 8


def _wrapper_batches(step):
    x, y = _data(W_STEPS * W_BATCH, 31)
    xv, yv = _data(W_STEPS * W_VAL, 32)
    s = slice(step * W_BATCH, (step + 1) * W_BATCH)
    sv = slice(step * W_VAL, (step + 1) * W_VAL)
    return (x[s], y[s]), (xv[sv], yv[sv])


def _shard(t, r, world=WORLD):
    n = t.shape[0] // world
    return t[r * n:(r + 1) * n]


def _wrapper_run(model, commentary, r, world):
    """W_STEPS student steps, a hyper-step after each; returns the state to compare."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hopt = torch.optim.SGD([p for p in commentary.parameters() if p.requires_grad], lr=0.5)
    vals = []
    for t in range(W_STEPS):
        (xb, yb), (xv, yv) = _wrapper_batches(t)
        vals.append((_shard(xv, r, world), _shard(yv, r, world)))
    teacher = CommentaryOptimizer(opt, model, commentary, val_loader=vals, hyper_every=1, hyper_optimizer=hopt,
                                  solver=NeumannConfig(K=3, alpha=None, damping=0.05), total_steps=W_STEPS)
    hgrads = []
    for t in range(W_STEPS):
        (xb, yb), _ = _wrapper_batches(t)
        teacher.zero_grad()
        loss = teacher.loss(_shard(xb, r, world), _shard(yb, r, world))
        loss.backward()
        teacher.step()
        hgrads.append({k: g.clone() for k, g in teacher.last_hyper.grads.items()})
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"commentary": {k: v.clone() for k, v in commentary.state_dict().items()},
            "student": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "hgrads": hgrads, "hyper_steps": teacher.hyper_steps}


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it steps with (the meta-gradients)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


BPTT_CASES = {  # name -> (reduction, inner optimizer, activation checkpoint on the ranks)
    "sum_sgd": ("sum", "sgd", None),
    "mean_momentum_ckpt": ("mean", "momentum", 2),
}


def _bptt_run(name, r, distributed):
    reduction, inner, ckpt = BPTT_CASES[name]
    com = _weighting(40 + r, reduction)  # rank 1 starts elsewhere: learn_bptt broadcasts rank 0's
    opt = _RecordingSGD([p for p in com.parameters() if p.requires_grad], lr=0.5)
    x, y = _data(24, 41)
    xv, yv = _data(10, 42)
    res = learn_bptt(com, lambda: _student(50 + r), (x, y), (xv, yv), inner_steps=4, inner_optimizer=inner,
                     inner_lr=0.3, outer_steps=2, outer_optimizer=opt, batch_size=8, same_init=True,
                     checkpoint=ckpt if distributed else None, seed=7 + 10 * r, distributed=distributed)
    return {"meta_grads": opt.seen, "commentary": {k: v.clone() for k, v in com.state_dict().items()},
            "val_losses": [h["val_loss"] for h in res.history], "info": res.info}


def _solver_decisions(r, sync):
    """Power iteration, CG and Neumann on ``diag(a_r)``, which differs between the ranks
    (the Neumann series diverges on rank 1's alone)."""
    a = torch.linspace(0.5, 2.0, 7, dtype=torch.float64) * (1.0 + 0.3 * r)
    op = lambda c: [a * c[0]]  # noqa: E731
    v = [torch.ones(7, dtype=torch.float64)]
    lam, _, used = power_iteration(op, v, 20, sync=sync)
    _, cg = conjugate_gradient(op, v, 20, 1e-8, sync=sync)
    _, ni = neumann(op, v, 5, 0.9, 1e-3, sync=sync)
    return (lam, used, cg["iterations"], cg["residual"], ni["diverged"], ni["terms_used"])


def _ift_run(r, distributed, reduction="mean", val_batch_size=None):
    com = _weighting(80 + r, reduction)  # rank 1 starts elsewhere: the wrapper broadcasts rank 0's
    student = _student(90 + r)  # likewise (learn_ift broadcasts a non-DDP student)
    hopt = torch.optim.SGD([p for p in com.parameters() if p.requires_grad], lr=0.5)
    x, y = _data(24, 81)
    xv, yv = _data(10, 82)  # the whole split: 5 validation examples per rank
    res = learn_ift(com, student, (x, y), (xv, yv), steps=3, batch_size=8,
                    student_optimizer=torch.optim.SGD(student.parameters(), lr=0.1), hyper_optimizer=hopt,
                    solver=CGConfig(max_iter=4, damping=0.5), seed=9 + 10 * r, distributed=distributed,
                    val_batch_size=val_batch_size)
    return {"commentary": {k: v.clone() for k, v in com.state_dict().items()},
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "val_losses": [h["val_loss"] for h in res.history], "info": res.info}


def _nan_policy_run(r, policy):
    """Three wrapper steps with a plain student (gradients not averaged); rank 1 alone
    has a NaN: in its batch at step 1 (``"skip"``), in a gradient at step 0 (``"raise"``) or
    in its batch at step 0 (``"raise_batch"``: loss() raised on that rank alone, the other
    one waited in its next collective)."""
    com, model = _weighting(70, "mean"), _student(60)
    teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, com, hyper_every=1,
                                  val_loader=[_data(4, 32 + r)], solver=NeumannConfig(K=1, alpha=0.1),
                                  nan_policy="raise" if policy.startswith("raise") else policy)
    for t in range(3):
        xb, yb = _data(4, 33 + 10 * t + r)
        if r == 1 and ((policy == "skip" and t == 1) or (policy == "raise_batch" and t == 0)):
            xb[0, 0] = float("nan")
        teacher.zero_grad()
        teacher.loss(xb, yb).backward()
        if policy == "raise" and r == 1:
            model[0].weight.grad[0, 0] = float("nan")
        try:
            teacher.step()
        except NonFiniteError as exc:
            return {"error": str(exc), "steps": teacher.steps}
    return {"commentary": {k: v.clone() for k, v in com.state_dict().items()}, "steps": teacher.steps,
            "skipped": teacher.skipped_steps, "hyper_steps": teacher.hyper_steps}


def _teacher_runs(r):
    """The reference teacher (BatchNorm) through the wrapper (DDP student), learn_ift and
    learn_bptt; each rank's shard updates its running statistics.  Its buffers after each."""
    def teacher():
        torch.manual_seed(3)
        return ExampleWeighting.reference((1, 2, 2), C).double()

    def student():
        torch.manual_seed(4)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, C)).double()

    x, y = _data(16, 61)
    x = x[:, :4].reshape(16, 1, 2, 2)
    xv, yv = x[:4] + 0.5, y[:4]
    out = {}
    com, model = teacher(), nn.parallel.DistributedDataParallel(student())
    teacher_opt = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, com, hyper_every=1,
                                      val_loader=[(_shard(xv, r), _shard(yv, r))], solver=NeumannConfig(K=1, alpha=0.1))
    for t in range(2):
        s = slice(8 * t + 4 * r, 8 * t + 4 * r + 4)
        teacher_opt.zero_grad()
        teacher_opt.loss(x[s], y[s]).backward()
        teacher_opt.step()
    out["wrapper"] = dict(com.named_buffers())
    com = teacher()
    torch.manual_seed(5)  # a plain (not DDP) student with BatchNorm: learn_ift keeps its buffers alike too
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, C), nn.BatchNorm1d(C)).double()
    learn_ift(com, plain, (x, y), (xv, yv), steps=2, batch_size=8, solver=NeumannConfig(K=1, alpha=0.1))
    out["ift"] = dict(com.named_buffers())
    out["ift_student"] = dict(plain.named_buffers())
    com = teacher()
    learn_bptt(com, student, (x, y), (xv, yv), inner_steps=2, outer_steps=1, batch_size=8, inner_lr=0.1)
    out["bptt"] = dict(com.named_buffers())
    return out


# --------------------------------------------------------------------------- the ranks


def _worker(r, world, tmp):
    torch.set_num_threads(1)
    out = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=r, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        # solvers: local operators that differ between the ranks, decisions made alike
        red = D.ShardReducer()
        out["solvers"] = _solver_decisions(r, red.sync)
        # engine; the ranks sum their local dot products differently (fused kernels on rank 0 only)
        previous = V.use_fused(r == 0)
        for name, (kind, solver, hvp, curvature, _, _) in ENGINE_CASES.items():
            tl, vl, params, hparams, com = _engine_setup(kind)
            tb, vb = _engine_shards(name, r)
            red = D.ShardReducer(train_reduction=getattr(com, "reduction", "mean"), train_size=tb["x"].shape[0],
                                 val_size=vb["x"].shape[0])
            res = implicit_hypergradient(tl, vl, params, hparams, tb, vb, solver=solver, hvp=hvp,
                                         curvature=curvature, reduce=red)
            keep = {k: v for k, v in res.info.items() if isinstance(v, (int, float, bool, str))}
            out[f"engine/{name}"] = {"grads": res.grads, "val_loss": res.val_loss, "info": keep}
        V.use_fused(previous)
        # wrapper with a DDP student; both start elsewhere on rank 1 (DDP and the wrapper broadcast rank 0's)
        model = nn.parallel.DistributedDataParallel(_student(60 + r))
        out["wrapper"] = _wrapper_run(model, _weighting(70 + r, "mean"), r, world)
        # learn_bptt
        for name in BPTT_CASES:
            out[f"bptt/{name}"] = _bptt_run(name, r, True)
        out["ift"] = _ift_run(r, True)
        # a "sum" commentary: the union's student gradient is the sum over the ranks (it was averaged:
        # student steps 1/world of one process's); a validation batch of one example: rank 1's shard
        # is empty (it raised there alone, and rank 0 waited in the hyper-step's collectives)
        out["ift_sum"] = _ift_run(r, True, reduction="sum")
        out["ift_val1"] = _ift_run(r, True, val_batch_size=1)
        out["teacher_buffers"] = _teacher_runs(r)
        for policy in ("skip", "raise", "raise_batch"):
            out[f"nan/{policy}"] = _nan_policy_run(r, policy)
        t = torch.full((3,), float(r + 1), dtype=torch.float64)  # 1 on rank 0 (weight 1), 2 on rank 1 (weight 3)
        out["weighted_mean"] = D.all_reduce_mean([t, t[:1].float()], weight=1 + 2 * r)
        # settings that differ between the ranks are refused on every rank
        for what, fn in (
            ("check_same", lambda: D.check_same({"steps": 3 + r})),
            ("bptt_batch", lambda: learn_bptt(_weighting(1, "sum"), lambda: _student(1), _data(8, 1), _data(4, 2),
                                              inner_steps=1, outer_steps=1, batch_size=3)),
            # learning rates and solvers are not broadcast: each rank would follow its own
            ("ift_student_lr", lambda: learn_ift(_weighting(1, "sum"), _student(1), _data(8, 1), _data(4, 2),
                                                 steps=1, batch_size=4, student_lr=1e-3 * (r + 1))),
            ("bptt_inner_lr", lambda: learn_bptt(_weighting(1, "sum"), lambda: _student(1), _data(8, 1), _data(4, 2),
                                                 inner_steps=1, outer_steps=1, batch_size=4, inner_lr=0.1 * (r + 1))),
            ("wrapper_solver", lambda s=_student(1): CommentaryOptimizer(
                torch.optim.SGD(s.parameters(), lr=0.1), s, _weighting(1, "sum"),
                solver=NeumannConfig(K=1 + r, alpha=0.1))),
            ("wrapper_lr", lambda s=_student(1): CommentaryOptimizer(
                torch.optim.SGD(s.parameters(), lr=0.1 * (r + 1)), s, _weighting(1, "sum"))),
            # what ranks pass a ShardReducer must agree (a size on one rank only paired its collective
            # with another one; equal-sized tensors of other shapes were mixed silently)
            ("reducer_size_one_rank", lambda: D.ShardReducer(train_size=4 if r == 0 else None)),
            ("reducer_layout", lambda: D.ShardReducer().train([torch.ones(2, 3) if r == 0 else torch.ones(3, 2)])),
        ):
            try:
                fn()
                out[f"error/{what}"] = None
            except ValueError as exc:
                out[f"error/{what}"] = str(exc)
    except Exception:
        out["traceback"] = traceback.format_exc()
        raise
    finally:
        torch.save(out, os.path.join(tmp, f"rank{r}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done and saved: leave without the interpreter's finalization, where torch's gloo/DDP
    # teardown once aborted a rank ("terminate called without an active exception", SIGABRT)
    # after its work was complete, which mp.spawn reports as a failed rank. A rank that raised
    # above still exits with its error.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(WORLD, tmp), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------- checks


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _assert_close_dict(got, ref, what):
    assert set(got) == set(ref), what
    for k in ref:
        assert torch.is_tensor(got[k]) and got[k].dtype == ref[k].dtype, (what, k)
        if ref[k].is_floating_point():
            assert _rel(got[k], ref[k]) <= RTOL, (what, k, _rel(got[k], ref[k]))
        else:
            assert torch.equal(got[k], ref[k]), (what, k)


def _assert_identical(a, b, what):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)


def test_solver_decisions_are_synchronised(ranks):
    assert ranks[0]["solvers"] == ranks[1]["solvers"]
    alone = [_solver_decisions(r, None) for r in range(WORLD)]  # without sync they differ
    assert alone[0][0] != alone[1][0] and alone[0][4] != alone[1][4]


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engine_hypergradient_equals_union(ranks, name):
    kind, solver, hvp, curvature, tsizes, vsizes = ENGINE_CASES[name]
    got = [ranks[r][f"engine/{name}"] for r in range(WORLD)]
    _assert_identical(got[0]["grads"], got[1]["grads"], name)  # the same on every rank, bit for bit
    assert got[0]["info"] == got[1]["info"]  # the same decisions (alpha, iterations, products)
    assert bool(got[0]["info"].get("fallback")) == name.endswith("_fallback")
    shards = [_engine_shards(name, r) for r in range(WORLD)]
    tl, vl, params, hparams, com = _engine_setup(kind)
    ref = implicit_hypergradient(tl, vl, params, hparams, _union([s[0] for s in shards]),
                                 _union([s[1] for s in shards]), solver=solver, hvp=hvp, curvature=curvature)
    _assert_close_dict(got[0]["grads"], ref.grads, name)
    assert abs(float(got[0]["val_loss"]) - float(ref.val_loss)) <= RTOL * abs(float(ref.val_loss))
    if 0 in vsizes:  # a rank without validation examples has no hypergradient of its own
        return
    # combining each rank's own hypergradient (with the union loss's weights) is not the union's
    own = [implicit_hypergradient(tl, vl, params, hparams, tb, vb, solver=solver, hvp=hvp, curvature=curvature).grads
           for tb, vb in shards]
    reduction = getattr(com, "reduction", "mean")
    coef = [1.0] * WORLD if reduction == "sum" else [n / sum(tsizes) for n in tsizes]
    for k in ref.grads:
        naive = sum(c * g[k] for c, g in zip(coef, own))
        assert _rel(naive, ref.grads[k]) > 1e-3, (name, k)


def test_wrapper_with_ddp_matches_single_process(ranks):
    got = [ranks[r]["wrapper"] for r in range(WORLD)]
    assert got[0]["hyper_steps"] == got[1]["hyper_steps"] == W_STEPS
    _assert_identical(got[0]["commentary"], got[1]["commentary"], "commentary")
    ref = _wrapper_run(_student(60), _weighting(70, "mean"), 0, 1)
    for t in range(W_STEPS):
        _assert_identical(got[0]["hgrads"][t], got[1]["hgrads"][t], f"hypergradient {t}")
        _assert_close_dict(got[0]["hgrads"][t], ref["hgrads"][t], f"hypergradient {t}")
    _assert_close_dict(got[0]["commentary"], ref["commentary"], "commentary")
    _assert_close_dict(got[0]["student"], ref["student"], "student")
    start = _weighting(70, "mean").state_dict()  # the hyper-steps did move the commentary
    assert all(_rel(got[0]["commentary"][k], start[k]) > 1e-3 for k in start)


@pytest.mark.parametrize("name", list(BPTT_CASES))
def test_learn_bptt_meta_gradient_equals_union(ranks, name):
    got = [ranks[r][f"bptt/{name}"] for r in range(WORLD)]
    _assert_identical(got[0]["commentary"], got[1]["commentary"], name)
    ref = _bptt_run(name, 0, False)  # one process, the whole global batch of 8
    assert len(got[0]["meta_grads"]) == len(ref["meta_grads"]) == 2
    for step, (g, rg) in enumerate(zip(got[0]["meta_grads"], ref["meta_grads"])):
        for a, b in zip(g, rg):
            assert b.norm() > 1e-6
            assert _rel(a, b) <= RTOL, (name, step, _rel(a, b))
        for a, b in zip(g, got[1]["meta_grads"][step]):
            assert torch.equal(a, b)
    _assert_close_dict(got[0]["commentary"], ref["commentary"], name)
    for a, b in zip(got[0]["val_losses"], ref["val_losses"]):
        assert abs(a - b) <= RTOL * abs(b)
    for r in range(WORLD):  # the outer optimizer's rate, not the unused outer_lr argument
        assert got[r]["info"]["outer_lr"] == 0.5 and got[r]["info"]["inner_lr"] == 0.3


def test_learn_ift_matches_single_process(ranks):
    got = [ranks[r]["ift"] for r in range(WORLD)]
    _assert_identical(got[0]["commentary"], got[1]["commentary"], "commentary")
    _assert_identical(got[0]["student"], got[1]["student"], "student")
    ref = _ift_run(0, False)
    _assert_close_dict(got[0]["commentary"], ref["commentary"], "commentary")
    _assert_close_dict(got[0]["student"], ref["student"], "student")
    assert len(got[0]["val_losses"]) == 3
    for r in range(WORLD):  # the hyper-optimizer's rate, not the unused hyper_lr argument
        assert got[r]["info"]["hyper_lr"] == 0.5
    for a, b in zip(got[0]["val_losses"], ref["val_losses"]):
        assert abs(a - b) <= RTOL * abs(b)


@pytest.mark.parametrize("case,kw", [("ift_sum", {"reduction": "sum"}), ("ift_val1", {"val_batch_size": 1})])
def test_learn_ift_sum_reduction_and_an_empty_validation_shard(ranks, case, kw):
    got = [ranks[r][case] for r in range(WORLD)]
    _assert_identical(got[0]["commentary"], got[1]["commentary"], "commentary")
    ref = _ift_run(0, False, **kw)
    _assert_close_dict(got[0]["commentary"], ref["commentary"], "commentary")
    _assert_close_dict(got[0]["student"], ref["student"], "student")


def _subgroup_worker(r, world, tmp):
    torch.set_num_threads(1)
    out = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=r, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        group = dist.new_group([1, 2])  # without global rank 0 (every rank makes it)
        if r > 0:
            m = nn.Linear(2, 2)
            with torch.no_grad():
                m.weight.fill_(float(r))
            D.broadcast_module_(m, group=group)
            out = {"seed": D.broadcast_int(10 + r, group=group), "weight": m.weight.detach().clone(),
                   "writer": __import__("commentaries_ext.checkpoint", fromlist=["_is_writer"])._is_writer(group)}
        dist.barrier()
    except Exception:
        out["traceback"] = traceback.format_exc()
        raise
    finally:
        torch.save(out, os.path.join(tmp, f"rank{r}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_a_process_group_without_global_rank_0(tmp_path):
    # torch.distributed takes a global source rank: src=0 failed ("Global rank 0 is not part of
    # group"), and checkpoints were written by global rank 0 only
    mp.spawn(_subgroup_worker, args=(3, str(tmp_path)), nprocs=3, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    assert all("traceback" not in o for o in out), [o.get("traceback") for o in out]
    assert out[1]["seed"] == out[2]["seed"] == 11  # the group's rank 0 is global rank 1
    assert torch.equal(out[2]["weight"], torch.ones(2, 2))
    assert out[1]["writer"] and not out[2]["writer"]


def test_nan_policy_decides_alike_on_every_rank(ranks):
    # a NaN on rank 1 alone skips the step (and its hyper-step) on both ranks, counted on both
    skip = [ranks[r]["nan/skip"] for r in range(WORLD)]
    for got in skip:
        assert (got["steps"], got["skipped"], got["hyper_steps"]) == (2, 1, 2)
    _assert_identical(skip[0]["commentary"], skip[1]["commentary"], "commentary")
    # a NaN gradient on rank 1 alone: step raises on both ranks, before stepping
    for what in ("raise", "raise_batch"):  # a NaN gradient, or batch, on rank 1 alone
        rais = [ranks[r][f"nan/{what}"] for r in range(WORLD)]
        assert all(got["steps"] == 0 for got in rais)
        assert "on another rank" in rais[0]["error"] and "on another rank" not in rais[1]["error"]


@pytest.mark.parametrize("how", ["wrapper", "ift", "bptt"])
def test_commentary_buffers_stay_identical(ranks, how):
    got = [ranks[r]["teacher_buffers"][how] for r in range(WORLD)]
    _assert_identical(got[0], got[1], how)  # rank 0's running statistics on every rank
    means = [v for k, v in got[0].items() if k.endswith("running_mean")]
    assert len(means) == 2 and all(float(m.abs().sum()) > 0 for m in means)  # they were updated


def test_learn_ift_plain_student_buffers_stay_identical(ranks):
    got = [ranks[r]["teacher_buffers"]["ift_student"] for r in range(WORLD)]
    _assert_identical(got[0], got[1], "student buffers")  # as DDP would: rank 0's running statistics
    assert float(got[0]["2.running_mean"].abs().sum()) > 0


def test_weighted_all_reduce_mean(ranks):
    for r in range(WORLD):
        a, b = ranks[r]["weighted_mean"]
        assert a.dtype == torch.float64 and b.dtype == torch.float32
        assert torch.allclose(a, torch.full((3,), 1.75, dtype=torch.float64)) and float(b) == 1.75


def test_differing_settings_are_refused_on_every_rank(ranks):
    for r in range(WORLD):
        assert "steps" in ranks[r]["error/check_same"]
        assert "divisible by the world size 2" in ranks[r]["error/bptt_batch"]
        assert "student_lr (from 0.001 to 0.002)" in ranks[r]["error/ift_student_lr"]
        assert "inner_lr (from 0.1 to 0.2)" in ranks[r]["error/bptt_inner_lr"]
        assert "solver (crc32)" in ranks[r]["error/wrapper_solver"]
        assert "optimizer lr (first group) (from 0.1 to 0.2)" in ranks[r]["error/wrapper_lr"]
        assert "train_size is given on 1 of 2 ranks" in ranks[r]["error/reducer_size_one_rank"]
        assert "train: shapes and dtypes" in ranks[r]["error/reducer_layout"]


def test_normalized_reduction_is_refused():
    with pytest.raises(ValueError, match="normalized"):
        D.ShardReducer(train_reduction="normalized")


@pytest.mark.parametrize("loss_reduction,reducer_reduction", [("normalized", "mean"), ("sum", "mean"), ("mean", "sum")])
def test_engine_refuses_a_reducer_for_another_reduction(loss_reduction, reducer_reduction):
    """implicit_hypergradient(reduce=) with a WeightedLoss that reduces otherwise than the reducer
    combines was silently wrong (relative errors 0.1 to 0.6 in a review); checked before any
    collective, so one process with a stand-in reducer shows it."""
    from types import SimpleNamespace

    fm = FunctionalModule(_student(1))
    com = _weighting(2, loss_reduction)
    x, y = _data(6, 3)
    with pytest.raises(ValueError, match=f"reduces with '{loss_reduction}' but reduce combines"):
        implicit_hypergradient(train_loss_fn(com, fm), val_loss_fn(fm), fm.params(), com.hparams(),
                               com.prepare(x, y, progress=0.0), {"x": x, "y": y},
                               reduce=SimpleNamespace(train_reduction=reducer_reduction))


def test_distributed_true_without_a_process_group_is_refused():
    """learn_bptt, learn_ift and the wrapper share one check (D.use_distributed): True without a
    process group raises instead of running on one process; None runs on one."""
    from commentaries_ext.learn import learn_bptt, learn_ift

    assert not D.enabled() and D.use_distributed(None) is False and D.use_distributed(False) is False
    x, y = _data(8, 3)
    msg = "distributed=True needs an initialised torch.distributed process group"
    with pytest.raises(ValueError, match=msg):
        learn_bptt(_weighting(2, "mean"), lambda: _student(1), (x, y), (x, y), inner_steps=1, outer_steps=1,
                   batch_size=4, distributed=True)
    with pytest.raises(ValueError, match=msg):
        learn_ift(_weighting(2, "mean"), _student(1), (x, y), (x, y), steps=1, batch_size=4, distributed=True)
