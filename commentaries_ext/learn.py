"""Learning loops for commentaries (DESIGN.md section 2).

* :func:`learn_bptt` -- Algorithm 1: for each outer step, a student from
  ``student_factory`` (the same initial weights every outer step, or fresh
  ones) trains ``inner_steps`` differentiable steps on the commentary-shaped
  loss (``engine.unroll``), the validation loss is backpropagated to the
  commentary through the whole trajectory (optionally truncated and/or
  checkpointed) and an outer optimiser updates it.
* :func:`learn_ift` -- Algorithm 2: student steps and IFT hyper-steps
  alternate (``engine.implicit_hypergradient`` through
  :class:`~commentaries_ext.wrapper.CommentaryOptimizer`).
* :func:`train_student` -- train a student with a fixed (learned) commentary,
  e.g. to reuse a saved commentary on a new architecture.

Data are ``(x, y)`` tensors; the example index of a training example is its
row, so tabular commentaries work out of the box.  Both loops return a
:class:`LearnResult` with the history (validation losses per step) and counts
of skipped steps (``nan_policy="skip"``).
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .commentary.base import (
    BatchError,
    Commentary,
    NonFiniteError,
    call_commentary,
    check_batch,
    check_logit_width,
    commentary_loss,
    kept_buffers,
    plain_ops,
    validation_loss,
)
from .checkpoint import (
    data_fingerprint,
    make_checkpointer,
    optimizer_config,
    plain,
    refuse_changes,
    rng_state,
    set_rng_state,
    shapes,
)
from .memory import reuse_cpu_memory
from .wrapper import CommentaryOptimizer

NAN_POLICIES = ("raise", "skip")


@dataclass
class LearnResult:
    """What a learning loop returns.  ``history``: one dict per logged step --
    ``val_loss`` (the validation loss; under torch.distributed that of the union
    of the shards, the same on every rank) and ``train_loss`` (the commentary-shaped
    training loss; learn_bptt: the mean over the inner steps).  Under
    torch.distributed ``train_loss`` is this rank's loss on its own shard, so it
    differs between the ranks (it is not averaged: that would cost a collective per step)."""

    commentary: Commentary
    history: list = field(default_factory=list)  # dicts: step, val_loss, train_loss ...
    skipped_steps: int = 0
    student: nn.Module | None = None
    info: dict = field(default_factory=dict)

    def learned_with(self) -> dict:
        """A summary for commentary files (``save_commentary(..., learned_with=...)``)."""
        return dict(self.info)


def _check_data(data, name, num_classes=None):
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise BatchError(f"{name} must be a tuple (x, y) of tensors")
    x, y = data[0], data[1]
    check_batch(x, y, num_classes, name=name)
    return x, y


def _check_counts(fn: str, **counts) -> None:
    """Each ``name=(value, minimum)`` must be an int >= minimum."""
    for name, (v, lo) in counts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # (numpy integers too)
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
        if v < lo:
            raise ValueError(f"{fn}: {name} must be >= {lo}, got {v}")


def _check_optional_counts(fn: str, **counts) -> None:
    """Like :func:`_check_counts` for arguments that may also be None."""
    _check_counts(fn, **{k: vl for k, vl in counts.items() if vl[0] is not None})


def _sample(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch_size,), generator=gen) if batch_size > n else torch.randperm(n, generator=gen)[:batch_size]


def _inner_opt(spec, lr):
    from .engine import SGD, Adam

    if isinstance(spec, str):
        if spec == "adam":
            return Adam(lr=lr)
        if spec == "sgd":
            return SGD(lr=lr)
        if spec == "momentum":
            return SGD(lr=lr, momentum=0.9)
        raise ValueError(f"inner_optimizer must be 'adam', 'sgd', 'momentum' or an engine optimizer, got {spec!r}")
    return spec


def _draw_batch(x, y, batch_size, gen, device, rank=0, world=1):
    """This rank's share of a random global batch: ``(x, y, index)``."""
    idx = _sample(x.shape[0], batch_size, gen)
    idx = idx[rank * (batch_size // world):(rank + 1) * (batch_size // world)]
    xb, yb = x[idx], y[idx]
    if device is not None:
        xb, yb = xb.to(device), yb.to(device)
    return xb, yb, idx.to(xb.device)  # data already on a GPU: x[idx] is there, the index must be too


def _val_batches(xv, yv, val_batch_size, gen):
    if val_batch_size is None or val_batch_size >= xv.shape[0]:
        return xv, yv
    idx = _sample(xv.shape[0], val_batch_size, gen)
    return xv[idx], yv[idx]


def _commentary_config(commentary, fixed=False):
    """Class and shapes of a commentary for a checkpoint's run configuration (``fixed``:
    also a hash of its values -- a commentary that is applied, not learned)."""
    if commentary is None:
        return None
    out = {"class": type(commentary).__name__, "shapes": shapes(commentary)}
    if callable(getattr(commentary, "config", None)):  # its constructor arguments (sigma, reduction, ...)
        try:
            out["config"] = plain(commentary.config())
        except NotImplementedError:
            pass
    if fixed:
        import hashlib

        from .files import _hash_tensor

        h = hashlib.sha256()
        for k, v in commentary.state_dict().items():
            h.update(k.encode())
            _hash_tensor(h, v.reshape(-1) if torch.is_tensor(v) else torch.as_tensor(v).reshape(-1))
        out["sha256"] = h.hexdigest()
    return out


def _engine_opt_config(opt):
    cfg = {"type": type(opt).__name__, **{k: v for k, v in vars(opt).items() if not k.startswith("_")}}
    # an option added later, at its old behaviour, is left out: checkpoints written before it
    # existed still match (their resume compares every key)
    if cfg.get("decoupled_weight_decay") is False:
        del cfg["decoupled_weight_decay"]
    return cfg


def _upgrade_checkpoint(state: dict, world: int) -> None:
    """A checkpoint of learn_bptt / learn_ift written before session 20's layout, in today's: fresh
    students' shapes moved from the configuration to the state; the world size was not recorded
    (taken as this run's, as those versions did)."""
    cfg = state["config"]
    if state.get("kind") == "learn_bptt" and cfg.get("same_init") is False and isinstance(cfg.get("student"), dict):
        state["student_shapes"] = cfg["student"]
        cfg["student"] = "fresh each outer step"
    if world > 1:
        cfg.setdefault("world_size", world)


class _Clock:
    """The job's wall time over all its runs (a resumed run adds the checkpoint's): ``info["seconds"]``
    at the end, with ``info["resumed_at_step"]`` when it continued a checkpoint."""

    def __init__(self, result, state, start):
        self.result, self.before, self.t0 = result, float((state or {}).get("seconds", 0.0)), time.perf_counter()
        if state is not None:
            result.info["resumed_at_step"] = start

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def stop(self) -> None:
        self.result.info["seconds"] = round(self.seconds(), 3)


def learn_bptt(commentary: Commentary, student_factory: Callable[[], nn.Module], train_data, val_data, *,
               inner_steps: int = 100, inner_optimizer: Any = "adam", inner_lr: float = 1e-4,
               outer_steps: int = 10, outer_lr: float = 1e-4, outer_optimizer: torch.optim.Optimizer | None = None,
               batch_size: int = 8, same_init: bool = True, truncate: int | None = None,
               checkpoint: int | None = None, val_batch_size: int | None = None, seed: int = 0,
               distributed: bool | None = None, process_group: Any = None,
               nan_policy: str = "raise", callback: Callable | None = None, device=None,
               checkpoint_path=None, checkpoint_every: int | None = None, resume: bool = True) -> LearnResult:
    """Algorithm 1 (backpropagation through training).

    ``student_factory()`` returns a fresh student ``nn.Module``; with
    ``same_init=True`` it is called once and every outer step starts from those
    weights.  ``inner_optimizer``: ``"adam"`` (reference), ``"sgd"``,
    ``"momentum"`` or an ``engine.SGD``/``engine.Adam``.  The validation loss is
    the mean over the whole validation split (``val_batch_size=None``, the
    reference) or a random batch of that size.  ``callback(step, record)`` is
    called after each outer step.

    Several processes (``distributed``; default: when a ``torch.distributed``
    process group is initialised; ``process_group``: the group): ``batch_size``
    is the *global* batch, drawn alike on every rank (rank 0's ``seed``), and
    each rank unrolls on its contiguous ``batch_size / world_size`` share of it
    (it must divide).  Each inner step's student gradient is combined over the
    ranks with a differentiable all-reduce (the sum for a commentary with
    ``reduction="sum"``, else the mean), so every rank follows the trajectory
    of the union of the shards; the validation loss is computed alike on every
    rank and the commentary's meta-gradient averaged over the ranks before the
    outer step -- it is then that of one process on the union.  Commentary,
    outer-optimizer state (and so its learning rate) and student initialisation
    come from rank 0; the other settings must agree on every rank (``ValueError``
    naming those that differ: ``inner_lr`` and the inner optimizer, ``outer_lr``,
    the step counts, ``batch_size``, ``same_init``, ...), and after
    each outer step the commentary's buffers (BatchNorm running statistics, updated
    from each rank's shard) are rank 0's again (``DistributedDataParallel``'s convention).
    ``history``'s ``train_loss`` is this rank's, on its shard (see :class:`LearnResult`).

    ``checkpoint`` is *activation* checkpointing of the unroll (recompute every
    N inner steps; memory).  ``checkpoint_path`` is a resumable checkpoint of the
    job (:mod:`commentaries_ext.checkpoint`), written every ``checkpoint_every``
    outer steps (default 1) and at the end; with ``resume`` an existing one with
    the same run configuration is continued (bit-exactly), one with another
    configuration refused (``CheckpointError``).
    """
    from .engine import FunctionalModule, unroll

    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    _check_counts("learn_bptt", inner_steps=(inner_steps, 1), outer_steps=(outer_steps, 0),
                  batch_size=(batch_size, 1))
    _check_optional_counts("learn_bptt", truncate=(truncate, 1), val_batch_size=(val_batch_size, 1))
    if isinstance(student_factory, nn.Module) or not callable(student_factory):
        raise TypeError("learn_bptt: student_factory must be a function that returns a fresh student nn.Module "
                        f"(e.g. models.student_factory(...)), got {type(student_factory).__name__}; learn_ift "
                        "takes the student module itself")
    x, y = _check_data(train_data, "train_data", commentary.num_classes)
    xv, yv = _check_data(val_data, "val_data", commentary.num_classes)
    from . import distributed as D

    dist_on = D.use_distributed(distributed)
    world, rank = (D.world_size(process_group), D.rank(process_group)) if dist_on else (1, 0)
    opt = _inner_opt(inner_optimizer, inner_lr)
    reducer = None
    if device is not None:
        # with the student and the batches, before the broadcast (NCCL needs GPU tensors) and
        # before its optimizer sees its parameters
        commentary.to(device)
    if dist_on:
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is the global batch under torch.distributed: "
                             f"it must be divisible by the world size {world}")
        # the inner optimizer is built here on each rank (not broadcast): its settings must agree
        inner_cfg = {k: v for k, v in _engine_opt_config(opt).items() if k != "lr"}
        D.check_same_settings({"inner_steps": inner_steps, "outer_steps": outer_steps, "batch_size": batch_size,
                             "truncate": truncate, "checkpoint": checkpoint, "val_batch_size": val_batch_size,
                             "train examples": x.shape[0], "validation examples": xv.shape[0],
                             "inner_lr": getattr(opt, "lr", None), "same_init": int(bool(same_init)),
                             "outer_lr": outer_lr if outer_optimizer is None else None},
                            {"inner_optimizer": inner_cfg, "nan_policy": nan_policy}, process_group)
        seed = D.broadcast_int(seed, group=process_group)
        D.broadcast_module_(commentary, group=process_group)
        reducer = D.ShardReducer(process_group, train_reduction=getattr(commentary, "reduction", "mean"))
    gen = torch.Generator().manual_seed(seed)
    hnames = [n for n, p in commentary.named_parameters() if p.requires_grad]
    if outer_optimizer is None:
        outer_optimizer = torch.optim.Adam([p for p in commentary.parameters() if p.requires_grad], lr=outer_lr)
    base = student_factory() if same_init else None
    if base is not None and device is not None:
        base = base.to(device)
    if dist_on:
        D.broadcast_optimizer_state_(outer_optimizer, group=process_group)
        if base is not None:
            D.broadcast_module_(base, group=process_group)
    result = LearnResult(commentary=commentary, info={
        # the learning rates used: an inner_optimizer object's, the outer optimizer's (rank 0's)
        "algorithm": "bptt", "inner_steps": inner_steps, "inner_optimizer": type(opt).__name__,
        "inner_lr": getattr(opt, "lr", inner_lr), "outer_steps": outer_steps,
        "outer_lr": outer_optimizer.param_groups[0]["lr"], "batch_size": batch_size, "same_init": same_init,
        "truncate": truncate, "checkpoint": checkpoint, "seed": seed})
    ck = make_checkpointer(checkpoint_path, "learn_bptt", lambda: {
        "inner_steps": inner_steps, "inner_optimizer": _engine_opt_config(opt), "outer_steps": outer_steps,
        "outer_optimizer": optimizer_config(outer_optimizer), "batch_size": batch_size, "same_init": same_init,
        "truncate": truncate, "activation_checkpoint": checkpoint, "val_batch_size": val_batch_size, "seed": seed,
        "nan_policy": nan_policy, "commentary": _commentary_config(commentary),
        # fresh students: their shapes are in the state and checked on a resume only (calling the
        # factory here would draw from, or re-seed, the random stream the run's students come from)
        "student": shapes(base) if base is not None else "fresh each outer step",
        "train_data": data_fingerprint((x, y)), "val_data": data_fingerprint((xv, yv)),
        **({"world_size": world} if world > 1 else {})},
        every=checkpoint_every, total=outer_steps, resume=resume, upgrade=lambda st: _upgrade_checkpoint(st, world),
        group=process_group if dist_on else None)
    start = 0
    st = ck.load() if ck is not None else None
    if st is not None:
        commentary.load_state_dict(st["commentary"])
        outer_optimizer.load_state_dict(st["outer_optimizer"])
        if base is not None:
            base.load_state_dict(st["base"])
        result.history, result.skipped_steps = list(st["history"]), int(st["skipped_steps"])
        if base is None:  # before the random streams are restored: this student is not the run's
            with torch.random.fork_rng(devices=[]):
                refuse_changes(ck.loaded_from, {"student": st.get("student_shapes")},
                               {"student": shapes(student_factory())})
        set_rng_state(st["rng"], {"gen": gen})
        start = int(st["step"])
    # same_init=False: the shapes of the fresh students, from the checkpoint or the first one built
    student_shapes = None if st is None else st.get("student_shapes")
    clock = _Clock(result, st, start)

    def ck_state():
        return {"commentary": commentary.state_dict(), "outer_optimizer": outer_optimizer.state_dict(),
                "base": None if base is None else base.state_dict(), "history": result.history,
                "skipped_steps": result.skipped_steps, "rng": rng_state({"gen": gen}),
                "student_shapes": student_shapes, "seconds": clock.seconds()}

    # one scope over the loop: each outer step reuses the blocks the previous one freed
    with reuse_cpu_memory():
        for step in range(start, outer_steps):
            student = copy.deepcopy(base) if same_init else student_factory()
            if not isinstance(student, nn.Module):
                raise TypeError(f"learn_bptt: student_factory() must return an nn.Module, got {type(student).__name__}")
            if not same_init and student_shapes is None:
                student_shapes = shapes(student)
            if device is not None:
                student = student.to(device)
            if dist_on and not same_init:
                D.broadcast_module_(student, group=process_group)
            student.train()
            fm = FunctionalModule(student)
            params0, buffers0 = fm.params(), {k: v.detach().clone() for k, v in fm.buffers().items()}
            batches = []
            for t in range(inner_steps):
                xb, yb, idx = _draw_batch(x, y, batch_size, gen, device, rank, world)
                batches.append(commentary.prepare(xb, yb, index=idx, progress=t / inner_steps, generator=gen))
            hparams = {n: p for n, p in commentary.named_parameters() if n in hnames}

            def loss_fn(params, buffers, hp, batch):
                prep = call_commentary(commentary, hp, batch)
                out, new_buffers = fm.call_update(params, buffers, prep.x)
                check_logit_width(commentary, out, "the student")
                with plain_ops():  # the unroll differentiates the loss twice: plain PyTorch cross-entropy
                    return commentary_loss(out, prep), new_buffers

            res = unroll(loss_fn, params0, opt, batches, hparams=hparams, buffers=buffers0, truncate=truncate,
                         checkpoint=checkpoint, grad_reduce=None if reducer is None else reducer.train)
            xvb, yvb = _val_batches(xv, yv, val_batch_size, gen)
            if device is not None:
                xvb, yvb = xvb.to(device), yvb.to(device)
            L_V = validation_loss(fm(res.params, xvb, buffers=res.buffers), yvb)
            train_loss = float(torch.stack(res.losses).mean()) if res.losses else float("nan")
            outer_optimizer.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(L_V))
            if ok:
                # activation checkpointing re-runs the inner steps in the backward: the commentary's
                # forward would update its running statistics (BatchNorm) a second time
                with kept_buffers(commentary) if checkpoint else contextlib.nullcontext():
                    L_V.backward()
                if reducer is not None:  # the union's meta-gradient: the mean over the ranks
                    ps = [p for p in commentary.parameters() if p.grad is not None]
                    for p, g in zip(ps, D.all_reduce_mean([p.grad for p in ps], group=process_group)):
                        p.grad.copy_(g)
                ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in commentary.parameters())
            if not ok:
                if nan_policy == "raise":
                    raise NonFiniteError(f"non-finite validation loss or hypergradient at outer step {step}")
                result.skipped_steps += 1
                outer_optimizer.zero_grad(set_to_none=True)
            else:
                outer_optimizer.step()
            if dist_on:  # the unroll updated the commentary's buffers (BatchNorm) from this rank's shard
                D.broadcast_buffers_(commentary, group=process_group)
            rec = {"step": step, "val_loss": float(L_V.detach()), "train_loss": train_loss, "skipped": not ok}
            result.history.append(rec)
            if callback is not None:
                callback(step, rec)
            if ck is not None:
                ck.step_done(step + 1, ck_state)
    clock.stop()
    return result


def learn_ift(commentary: Commentary, student: nn.Module, train_data, val_data, *, steps: int = 100,
              batch_size: int = 8, student_optimizer: torch.optim.Optimizer | None = None, student_lr: float = 1e-3,
              hyper_lr: float = 1e-2, hyper_every: int = 1, hyper_optimizer: torch.optim.Optimizer | None = None,
              solver: Any = None, curvature: str = "hessian", hvp: str = "auto", fresh_train_batch: bool = True,
              val_batch_size: int | None = None, seed: int = 0, nan_policy: str = "raise",
              distributed: bool | None = None, process_group: Any = None,
              callback: Callable | None = None, log_every: int = 1, device=None,
              checkpoint_path=None, checkpoint_every: int | None = None, resume: bool = True) -> LearnResult:
    """Algorithm 2 (implicit differentiation), student and hyper-steps alternating.

    Defaults follow the reference: Adam for the student (``student_lr=1e-3``),
    a hyper-step after every student step with Adam (``hyper_lr=1e-2``),
    Neumann ``K=1`` with ``alpha`` = the student's learning rate, ``g_T`` on a
    fresh training batch (``fresh_train_batch``) and ``v`` on a clean
    validation batch (``val_batch_size``; None: the whole split).

    Several processes (``distributed``, ``process_group``: as in :func:`learn_bptt`):
    ``batch_size`` and the validation batch are global, drawn alike on every rank
    (rank 0's ``seed``); each rank takes its share (``batch_size`` must divide by
    the world size; the validation batch is split as evenly as it goes) and the
    wrapper computes the hypergradient of the union of the shards.  The student's
    gradients are averaged over the ranks (by the student itself when it is a
    ``DistributedDataParallel``, else here), its initial weights come from rank 0,
    and so do a given ``student_optimizer``'s state and learning rates; the other
    settings (``student_lr``, ``hyper_lr``, ``solver``, the step counts, ...) must
    agree on every rank (``ValueError`` naming those that differ);
    the commentary's buffers are rank 0's after each step (see ``CommentaryOptimizer``).
    ``history``'s ``train_loss`` is this rank's, on its shard (see :class:`LearnResult`).

    ``checkpoint_path``: a resumable checkpoint of the job (student, commentary,
    both optimizers, engine state, RNGs, history), written every
    ``checkpoint_every`` steps (default 50) and at the end; with ``resume`` an
    existing one with the same run configuration is continued bit-exactly.
    """
    _check_counts("learn_ift", steps=(steps, 0), batch_size=(batch_size, 1), hyper_every=(hyper_every, 0))
    _check_optional_counts("learn_ift", val_batch_size=(val_batch_size, 1))
    if not isinstance(student, nn.Module):
        raise TypeError(f"learn_ift: student must be the student nn.Module, got {type(student).__name__}; "
                        "learn_bptt takes a factory of fresh students")
    x, y = _check_data(train_data, "train_data", commentary.num_classes)
    xv, yv = _check_data(val_data, "val_data", commentary.num_classes)
    from . import distributed as D

    dist_on = D.use_distributed(distributed)
    world, rank = (D.world_size(process_group), D.rank(process_group)) if dist_on else (1, 0)
    # the union's loss of a "sum" commentary sums the ranks' (equal) shards: so do its gradients
    union_sums = getattr(commentary, "reduction", "mean") == "sum"
    if dist_on:
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is the global batch under torch.distributed: "
                             f"it must be divisible by the world size {world}")
        # a default student optimizer is built here on each rank (not broadcast): its rate must agree
        D.check_same({"steps": steps, "batch_size": batch_size, "hyper_every": hyper_every,
                      "val_batch_size": val_batch_size, "fresh_train_batch": int(fresh_train_batch),
                      "train examples": x.shape[0], "validation examples": xv.shape[0],
                      "student_lr": student_lr if student_optimizer is None else None,
                      "student_optimizer given": int(student_optimizer is not None),
                      "hyper_lr": hyper_lr if hyper_optimizer is None else None}, process_group)
        seed = D.broadcast_int(seed, group=process_group)
    gen = torch.Generator().manual_seed(seed)
    if device is not None:
        student = student.to(device)
        commentary.to(device)  # with the student and the batches (before its optimizer sees its parameters)
    ddp = isinstance(student, nn.parallel.DistributedDataParallel)
    if dist_on and not ddp:  # (DDP broadcasts rank 0's weights itself)
        D.broadcast_module_(student, group=process_group)
    if student_optimizer is None:
        student_optimizer = torch.optim.Adam(student.parameters(), lr=student_lr)
    elif dist_on:
        D.broadcast_optimizer_state_(student_optimizer, group=process_group)
    vb = val_batch_size if val_batch_size is not None else xv.shape[0]

    class _Val:
        def __iter__(self):
            while True:
                xb, yb = _val_batches(xv, yv, vb, gen)
                if dist_on:  # this rank's share of the global validation batch
                    xb, yb = torch.tensor_split(xb, world)[rank], torch.tensor_split(yb, world)[rank]
                yield (xb, yb) if device is None else (xb.to(device), yb.to(device))

    teacher = CommentaryOptimizer(student_optimizer, student, commentary, val_loader=_Val(), hyper_every=0,
                                  hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr, solver=solver,
                                  curvature=curvature, hvp=hvp, total_steps=steps, nan_policy=nan_policy,
                                  generator=gen, distributed=dist_on, process_group=process_group)
    result = LearnResult(commentary=commentary, student=student, info={
        "algorithm": "ift", "steps": steps, "batch_size": batch_size, "student_optimizer": type(student_optimizer).__name__,
        "student_lr": student_optimizer.param_groups[0]["lr"], "hyper_every": hyper_every,
        "hyper_lr": hyper_lr if teacher.hyper_optimizer is None else teacher.hyper_optimizer.param_groups[0]["lr"],
        "solver": repr(teacher._solver()) if solver is None else repr(solver), "curvature": curvature, "seed": seed})

    def draw():
        return _draw_batch(x, y, batch_size, gen, device, rank, world)

    ck = make_checkpointer(checkpoint_path, "learn_ift", lambda: {
        "steps": steps, "batch_size": batch_size, "student_optimizer": optimizer_config(student_optimizer),
        "hyper_optimizer": optimizer_config(teacher.hyper_optimizer), "hyper_every": hyper_every,
        "solver": result.info["solver"], "curvature": curvature, "hvp": hvp, "fresh_train_batch": fresh_train_batch,
        "val_batch_size": val_batch_size, "seed": seed, "nan_policy": nan_policy, "log_every": log_every,
        "commentary": _commentary_config(commentary), "student": shapes(student),
        "train_data": data_fingerprint((x, y)), "val_data": data_fingerprint((xv, yv)),
        # the shards change the computation (per-shard BatchNorm statistics, blending partners)
        **({"world_size": world} if world > 1 else {})},
        every=checkpoint_every, total=steps, resume=resume, upgrade=lambda st: _upgrade_checkpoint(st, world),
        group=process_group if dist_on else None)
    start = 0
    st = ck.load() if ck is not None else None
    if st is not None:
        student.load_state_dict(st["student"])
        teacher.load_state_dict(st["teacher"])
        result.history = list(st["history"])
        set_rng_state(st["rng"], {"gen": gen})
        start = int(st["step"])
    clock = _Clock(result, st, start)

    def ck_state():
        return {"student": student.state_dict(), "teacher": teacher.state_dict(), "history": result.history,
                "rng": rng_state({"gen": gen}), "seconds": clock.seconds()}

    student.train()
    # one scope over the loop: the hyper-steps and student steps reuse each other's freed blocks
    with reuse_cpu_memory():
        for step in range(start, steps):
            xb, yb, idx = draw()
            teacher.zero_grad()
            loss = teacher.loss(xb, yb, index=idx)
            loss.backward()
            if dist_on and not ddp:  # the student's gradient: the union's (as DDP's, but a "sum" loss sums)
                ps = [p for p in student.parameters() if p.grad is not None]
                for p, g in zip(ps, D.all_reduce_mean([p.grad for p in ps], group=process_group)):
                    p.grad.copy_(g.mul_(world) if union_sums else g)
            teacher.step()
            if dist_on and not ddp:  # as DDP does: rank 0's running statistics (each rank's come from its shard)
                D.broadcast_buffers_(student, group=process_group)
            rec = {"step": step, "train_loss": float(loss.detach())}
            if hyper_every and (step + 1) % hyper_every == 0 and teacher.steps > 0:
                tb = None
                if fresh_train_batch:
                    xf, yf, idf = draw()
                    tb = commentary.prepare(xf, yf, index=idf, progress=teacher.progress(), generator=gen)
                res = teacher.hyper_step(train_batch=tb)
                rec["val_loss"] = float(res.val_loss) if res is not None else float("nan")  # None: skipped (NaN/Inf)
            if callback is not None:
                callback(step, rec)
            if step % max(1, log_every) == 0 or step == steps - 1:
                result.history.append(rec)
            if ck is not None:
                ck.step_done(step + 1, ck_state)
    result.skipped_steps = teacher.skipped_steps + teacher.skipped_hyper_steps
    result.info["skipped_student_steps"] = teacher.skipped_steps
    result.info["skipped_hyper_steps"] = teacher.skipped_hyper_steps
    clock.stop()
    return result


def train_student(student: nn.Module, train_data, *, commentary: Commentary | None = None, steps: int = 100,
                  batch_size: int = 8, optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
                  seed: int = 0, nan_policy: str = "raise", device=None, checkpoint_path=None,
                  checkpoint_every: int | None = None, resume: bool = True) -> list[float]:
    """Train ``student`` with a fixed commentary (or none); returns the training losses.

    ``checkpoint_path``/``checkpoint_every`` (default 50 steps)/``resume``: as in
    :func:`learn_ift` (the configuration includes a hash of the commentary's values)."""
    _check_counts("train_student", steps=(steps, 0), batch_size=(batch_size, 1))
    x, y = _check_data(train_data, "train_data", getattr(commentary, "num_classes", None))
    gen = torch.Generator().manual_seed(seed)
    if device is not None:
        student = student.to(device)
        if commentary is not None:
            commentary.to(device)
    optimizer = optimizer or torch.optim.Adam(student.parameters(), lr=lr)
    teacher = CommentaryOptimizer(optimizer, student, commentary, hyper_every=0, total_steps=steps,
                                  nan_policy=nan_policy, generator=gen)
    losses = []
    ck = make_checkpointer(checkpoint_path, "train_student", lambda: {
        "steps": steps, "batch_size": batch_size, "optimizer": optimizer_config(optimizer), "seed": seed,
        "nan_policy": nan_policy, "commentary": _commentary_config(commentary, fixed=True),
        "student": shapes(student), "train_data": data_fingerprint((x, y))},
        every=checkpoint_every, total=steps, resume=resume)
    start = 0
    st = ck.load() if ck is not None else None
    if st is not None:
        student.load_state_dict(st["student"])
        teacher.load_state_dict(st["teacher"])
        losses = list(st["losses"])
        set_rng_state(st["rng"], {"gen": gen})
        start = int(st["step"])

    def ck_state():
        return {"student": student.state_dict(), "teacher": teacher.state_dict(), "losses": losses,
                "rng": rng_state({"gen": gen})}

    student.train()
    for step in range(start, steps):
        xb, yb, idx = _draw_batch(x, y, batch_size, gen, device)
        teacher.zero_grad()
        loss = teacher.loss(xb, yb, index=idx)
        loss.backward()
        teacher.step()
        losses.append(float(loss.detach()))
        if ck is not None:
            ck.step_done(step + 1, ck_state)
    return losses


@torch.no_grad()
def evaluate(student: nn.Module, data, batch_size: int = 1024) -> dict:
    """``{"loss": mean CE, "accuracy": ...}`` of ``student`` (eval mode) on ``(x, y)``."""
    x, y = data[0], data[1]
    was = student.training
    student.eval()
    try:
        dev = next(iter(student.parameters())).device
        tot, correct = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            out = student(xb)
            tot += float(validation_loss(out, yb)) * xb.shape[0]
            correct += int((out.argmax(1) == yb).sum())
    finally:
        student.train(was)
    return {"loss": tot / x.shape[0], "accuracy": correct / x.shape[0]}
