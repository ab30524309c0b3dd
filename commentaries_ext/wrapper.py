"""The drop-in optimizer wrapper: add a commentary to your own training loop.

You keep your model, your ``torch.optim`` optimizer, your LR scheduler and your
loop; the wrapper applies the commentary to each batch, steps your optimizer,
and every ``hyper_every`` steps runs a hyper-step on the commentary with the
implicit-differentiation engine (a validation batch from ``val_loader``)::

    teacher = CommentaryOptimizer(optimizer, model, commentary, val_loader=val_loader, hyper_every=1)
    for x, y in loader:
        teacher.zero_grad()
        loss = teacher.loss(x, y)            # commentary applied (plain CE when switched off)
        loss.backward()                      # or scaler.scale(loss).backward()
        teacher.step()                       # optimizer.step() (+ a hyper-step every k steps)
        scheduler.step()                     # your scheduler, on your optimizer

``enabled=False`` makes ``loss`` exactly ``criterion(model(x), y)`` and ``step``
exactly ``optimizer.step()``: plain training, bit-identical to the loop without
the wrapper.  With AMP, compute ``loss`` under ``torch.autocast`` as usual and
pass ``scaler=`` (the wrapper then calls ``scaler.step(optimizer)`` and
``scaler.update()``); hyper-steps always run in float32 outside autocast.

Non-finite data or losses follow ``nan_policy``: ``"raise"``
(:class:`~commentaries_ext.commentary.NonFiniteError`) or ``"skip"`` (the step
is dropped, gradients cleared, the running statistics the batch changed in the
commentary and the student restored, and counted in ``skipped_steps``; non-finite
hypergradients likewise in ``skipped_hyper_steps``).
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from ._stack import user_stacklevel
from .commentary.base import (
    BatchError,
    Commentary,
    NonFiniteError,
    check_batch,
    check_logit_width,
    commentary_loss,
    restore_buffers,
    snapshot_buffers,
    train_loss_fn,
    val_loss_fn,
)

NAN_POLICIES = ("raise", "skip")


def _split_batch(b):
    if isinstance(b, dict):
        missing = [k for k in ("x", "y") if k not in b]
        if missing:
            raise BatchError(f"a validation batch dict needs the keys 'x' and 'y'; it has no {missing} (its keys: "
                             f"{sorted(str(k) for k in b)})")
        return b["x"], b["y"]
    if isinstance(b, (tuple, list)) and len(b) >= 2:
        return b[0], b[1]
    raise BatchError(f"a validation batch must be (x, y) or a dict with 'x' and 'y', got {type(b).__name__}")


class CommentaryOptimizer:
    """Wraps ``optimizer`` (a ``torch.optim.Optimizer`` over ``model``'s parameters).

    Parameters
    ----------
    commentary: the commentary module (None or ``enabled=False``: plain training).
    val_loader: iterable of ``(x, y)`` validation batches (cycled); needed for hyper-steps.
    hyper_every: a hyper-step after every ``k`` student steps (0: never -- apply a fixed commentary).
    hyper_optimizer: optimizer over the commentary's parameters (default ``Adam(lr=hyper_lr)``).
    solver: ``engine.NeumannConfig`` / ``engine.CGConfig``; default Neumann with ``K=1`` and
        ``alpha`` = the student's current learning rate (the reference setting): with several
        parameter groups, the first group's (a warning says so once if their rates differ; pass
        ``solver=NeumannConfig(K=1, alpha=...)`` to choose).
    curvature, hvp: passed to ``engine.implicit_hypergradient``.  During a hyper-step the
        student's and commentary's Dropout, RReLU and MultiheadAttention modules run in eval mode (the engine
        needs one deterministic training loss: ``engine.random_modules_eval``).
    total_steps: for the training progress ``i/T`` fed to the commentary (default: 0).
    criterion: the plain loss used when switched off (default ``F.cross_entropy``).
    hyper_train_loader: optional iterable of ``(x, y[, index])`` batches: the hyper-step's
        ``g_T`` is then taken on a fresh training batch (the reference setting) instead of
        the batch of the last student step.
    distributed: several processes, each with its shard of every batch (default: when a
        ``torch.distributed`` process group is initialised; ``True`` without one raises
        ``ValueError``); ``process_group``: the group (default: the world).  See "Several
        processes" below.

    Several processes
    -----------------
    Wrap the student in ``DistributedDataParallel`` (its gradients are then averaged
    by DDP; the wrapper differentiates its ``.module``), give every rank its own
    shard of the training and validation batches, and use the wrapper as usual::

        model = DDP(student)                      # gloo on CPU, NCCL on GPUs
        teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                      commentary, val_loader=my_val_shards, hyper_every=1)

    At construction the commentary's parameters and buffers and the hyper-optimizer's
    state are broadcast from rank 0; after each ``step`` the commentary's buffers
    (e.g. the reference teacher's BatchNorm running statistics, updated by ``loss``
    from each rank's shard) are rank 0's again, as ``DistributedDataParallel`` does
    with a student's buffers.  What is not broadcast must agree, and is checked at
    construction (``ValueError`` naming it): ``solver``, ``curvature``, ``hvp``,
    ``hyper_every``, ``total_steps``, ``nan_policy`` and the optimizer's first
    learning rate (the default Neumann ``alpha``).  Each hyper-step is the hypergradient of the
    *union* of the ranks' shards (``commentaries_ext.distributed``): ``v = dL_V/dtheta``,
    every Hessian-vector product, the mixed term and the solvers' scalars are
    combined across ranks (averaging each rank's final hypergradient would not be:
    the IFT formula is nonlinear in the data), so the hypergradient -- and the
    commentary after the hyper-optimizer's step -- is bit-identical on every rank.
    Shards of different sizes are weighted by their sizes; the commentary's
    ``reduction="sum"`` makes the union loss the sum over ranks (note that DDP
    averages the student's gradients), ``"normalized"`` is refused.  BatchNorm in
    training mode uses each shard's statistics (DDP without ``SyncBatchNorm``),
    so the result is the hypergradient of the mean of the per-rank losses, not
    that of one process on the concatenated batch.  ``nan_policy`` decides for
    all ranks at once (one small all-reduce per step): a non-finite batch, loss
    or gradient on any rank skips the step and its hyper-step on every rank
    (``"skip"``, counted on each) or makes ``step`` raise on every rank
    (``"raise"``; in one process a NaN/Inf training batch raises in ``loss`` already,
    under torch.distributed in ``step``, on every rank together).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, commentary: Commentary | None = None, *,
                 val_loader: Iterable | None = None, hyper_every: int = 1,
                 hyper_optimizer: torch.optim.Optimizer | None = None, hyper_lr: float = 1e-2,
                 solver: Any = None, curvature: str = "hessian", hvp: str = "auto", enabled: bool = True,
                 total_steps: int | None = None, scaler: Any = None, nan_policy: str = "raise",
                 criterion: Callable = F.cross_entropy, generator: torch.Generator | None = None,
                 hyper_train_loader: Iterable | None = None, distributed: bool | None = None,
                 process_group: Any = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if isinstance(hyper_every, bool) or not isinstance(hyper_every, int):
            raise TypeError(f"hyper_every must be an int, got {type(hyper_every).__name__}")
        if hyper_every < 0:
            raise ValueError(f"hyper_every must be >= 0, got {hyper_every}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 0):
            raise ValueError(f"total_steps must be None or an int >= 0, got {total_steps!r}")
        D.use_distributed(distributed)  # refuses True without a process group now, not at step()
        owned = {id(p) for p in model.parameters()}
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        if stepped and not any(id(p) in owned for p in stepped):
            raise ValueError("optimizer holds none of model's parameters (made for another model?): the "
                             "student would not train while its commentary is learned")
        self.optimizer, self.model, self.commentary = optimizer, model, commentary
        self.enabled = bool(enabled) and commentary is not None
        self.val_loader = val_loader
        self.hyper_every = int(hyper_every)
        self.solver, self.curvature, self.hvp = solver, curvature, hvp
        self.total_steps = total_steps
        self.scaler = scaler
        self.nan_policy = nan_policy
        self._saved_buffers: list | None = None  # nan_policy="skip": the buffers before loss()
        self.criterion = criterion
        self.generator = generator
        self.steps = 0
        self.hyper_steps = 0
        self.skipped_steps = 0
        self.skipped_hyper_steps = 0
        self.amp_skipped_steps = 0
        self.last_hyper = None  # the last engine HypergradResult
        self._last_batch = None
        self._last_loss = None
        self._loss_since_step = False  # step() needs this step's loss from loss()
        self._bad_batch = False
        self._val_iter = None
        self.hyper_train_loader = hyper_train_loader
        self._train_iter = None
        # batches taken from each loader in its current pass (state_dict: a resume skips them)
        self._taken = {"_val_iter": 0, "_train_iter": 0}
        self.distributed = distributed
        self.process_group = process_group
        self._engine_state = None
        self._fm = None
        self._warned_lrs = False
        if commentary is not None:
            hp = [p for p in commentary.parameters() if p.requires_grad]
            if hyper_optimizer is None and hp:
                hyper_optimizer = torch.optim.Adam(hp, lr=hyper_lr)
        self.hyper_optimizer = hyper_optimizer
        lr0 = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else None
        if commentary is not None and self._dist():  # every rank starts from rank 0's commentary
            D.broadcast_module_(commentary, group=process_group)
            if hyper_optimizer is not None:
                D.broadcast_optimizer_state_(hyper_optimizer, group=process_group)
            # not broadcast, so they must agree: each rank would otherwise take its own hyper-step
            # (the default Neumann alpha is the student's learning rate) or issue other collectives
            D.check_same_settings({"hyper_every": hyper_every, "total_steps": total_steps,
                                 "enabled": int(self.enabled), "optimizer lr (first group)": lr0,
                                 "optimizer parameter groups": len(optimizer.param_groups)},
                                {"solver": solver, "curvature": curvature, "hvp": hvp, "nan_policy": nan_policy},
                                process_group)

    # ------------------------------------------------------------------ optimizer face
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the training loss
    def progress(self) -> float:
        return min(1.0, self.steps / self.total_steps) if self.total_steps else 0.0

    def loss(self, x: torch.Tensor, y: torch.Tensor, *, index: torch.Tensor | None = None,
             progress: float | None = None) -> torch.Tensor:
        """The training loss of ``model`` on the batch, with the commentary applied."""
        if not self.enabled:
            out = self.criterion(self.model(x), y)
            self._last_loss = out
            return out
        self._bad_batch = torch.is_tensor(x) and not bool(torch.isfinite(x).all())  # (prepare names a non-tensor)
        # under torch.distributed step() raises on every rank together (a rank raising here alone
        # would leave the others waiting in their next collective)
        if self._bad_batch and self.nan_policy == "raise" and not self._dist():
            raise NonFiniteError(f"training batch at step {self.steps} contains NaN or Inf (nan_policy='raise')")
        batch = self.commentary.prepare(x, y, index=index, progress=self.progress() if progress is None else progress,
                                        generator=self.generator)
        # a skipped step also drops what its batches did to running statistics: the buffers as
        # they were at the first loss() since the last step (several with gradient accumulation)
        if self.nan_policy == "skip" and self._saved_buffers is None:
            self._saved_buffers = snapshot_buffers(*self._buffer_owners())
        with torch.no_grad():  # the student step needs no graph into the commentary
            prep = self.commentary(batch)
        logits = self.model(prep.x)
        check_logit_width(self.commentary, logits, "the student")
        out = commentary_loss(logits, prep)
        self._last_batch = batch
        self._loss_since_step = True
        self._last_loss = out
        return out

    # ------------------------------------------------------------------ steps
    def _buffer_owners(self) -> tuple[nn.Module, nn.Module]:
        """The modules whose buffers (BatchNorm running statistics) a batch updates."""
        return self.commentary, self._module()

    def _grads_finite(self) -> bool:
        gs = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not gs:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in gs]).all())

    def step(self, closure: Callable | None = None):
        """Step the student (and every ``hyper_every`` steps the commentary).

        Returns what ``optimizer.step`` returns (None when the step was skipped)."""
        if not self.enabled:
            if self.scaler is not None:
                out = self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            self.steps += 1
            return out
        if not self._loss_since_step and closure is None:
            # (the optimizer would step on gradients of some other loss, and the hyper-step
            # would reuse the batch of an earlier loss() call)
            raise RuntimeError("step() without this step's loss: compute it with teacher.loss(x, y) (which applies "
                               "the commentary) before backward() and step()")
        self._loss_since_step = False
        bad = self._bad_batch or (self._last_loss is not None and not bool(torch.isfinite(self._last_loss.detach())))
        if not bad and self.scaler is None:
            bad = not self._grads_finite()
        here = bad
        if self._dist():  # one decision for all ranks: a rank alone skipping would mis-pair the next collectives
            bad = D.any_rank(bad, self.process_group)
        if bad and self._saved_buffers is not None:  # BatchNorm statistics of a NaN batch would stay NaN
            restore_buffers(self._saved_buffers, *self._buffer_owners())
        self._saved_buffers = None
        if self._dist():  # loss() ran the commentary on this rank's shard (BatchNorm running statistics)
            D.broadcast_buffers_(self.commentary, group=self.process_group)
        if bad:
            if self.nan_policy == "raise":
                raise NonFiniteError(f"non-finite training loss or gradients at step {self.steps}"
                                     f"{'' if here else ' on another rank'} (nan_policy='raise')")
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_batch = False
            self._last_loss = None
            return None
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            out = self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.amp_skipped_steps += 1
        else:
            out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.steps += 1
        if self.hyper_every and self.steps % self.hyper_every == 0 and self.hyper_optimizer is not None:
            self.hyper_step()
        return out

    # ------------------------------------------------------------------ hyper-steps
    def _next_from(self, attr: str, loader, what: str):
        it = getattr(self, attr)
        if it is None:
            it = iter(loader)
            setattr(self, attr, it)
            # resumed part-way through a pass (load_state_dict) of a sized loader: skip what was taken
            # (an endless stream, e.g. random batches from a restored generator, just continues)
            for _ in range(self._taken[attr] if hasattr(loader, "__len__") else 0):
                if next(it, None) is None:
                    it = iter(loader)
                    setattr(self, attr, it)
                    self._taken[attr] = 0
                    break
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            setattr(self, attr, it)
            self._taken[attr] = 0
            try:
                b = next(it)
            except StopIteration:
                raise ValueError(f"{what} is empty") from None
        self._taken[attr] += 1
        return b

    def _next_val(self):
        if self.val_loader is None:
            raise ValueError("hyper-steps need validation data: pass val_loader= (or hyper_every=0)")
        return self._next_from("_val_iter", self.val_loader, "val_loader")

    def _fresh_train_batch(self, dev):
        b = self._next_from("_train_iter", self.hyper_train_loader, "hyper_train_loader")
        if isinstance(b, dict):
            x, y, idx = b["x"], b["y"], b.get("index")
        else:
            x, y, idx = b[0], b[1], (b[2] if len(b) > 2 else None)
        return self.commentary.prepare(x.to(dev), y.to(dev), index=None if idx is None else idx.to(dev),
                                       progress=self.progress(), generator=self.generator)

    def _module(self) -> nn.Module:
        """The plain student the engine differentiates: inside DDP's ``module`` and a
        ``torch.compile``d module's ``_orig_mod`` (compiled graphs have no double backward).
        It holds the same parameters; ``loss`` still calls the user's (compiled) model."""
        from .engine.functional import uncompiled

        m = uncompiled(self.model)
        while isinstance(m, nn.parallel.DistributedDataParallel):
            m = uncompiled(m.module)
        return m

    def _dist(self) -> bool:
        return D.use_distributed(self.distributed)

    def _solver(self):
        from .engine import NeumannConfig

        if self.solver is not None:
            return self.solver
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if len(set(lrs)) > 1 and not self._warned_lrs:
            self._warned_lrs = True
            warnings.warn(f"CommentaryOptimizer: the parameter groups have different learning rates {lrs}; the "
                          f"hyper-step's Neumann alpha is the first group's ({lrs[0]}). Pass "
                          "solver=NeumannConfig(K=1, alpha=...) to choose it", UserWarning,
                          stacklevel=user_stacklevel())
        return NeumannConfig(K=1, alpha=lrs[0])

    def hypergradient(self, train_batch: dict | None = None, val_batch: Any = None):
        """The engine's IFT hypergradient at the current student (no update)."""
        from .engine import EngineState, FunctionalModule, implicit_hypergradient, random_modules_eval

        if self._fm is None:  # built once: the engine caches its traced HVP per loss callable
            self._fm = FunctionalModule(self._module())
            if self._engine_state is None:  # load_state_dict may have restored one
                self._engine_state = EngineState()
            self._losses = (train_loss_fn(self.commentary, self._fm, split=self.curvature == "gauss_newton"),
                            val_loss_fn(self._fm))
        fm = self._fm
        train_loss, val_loss = self._losses
        dev = next(iter(self.model.parameters())).device
        if train_batch is None and self.hyper_train_loader is not None:
            train_batch = self._fresh_train_batch(dev)
        train_batch = self._last_batch if train_batch is None else train_batch
        if train_batch is None:
            raise ValueError("no training batch yet: call loss(x, y) first or pass train_batch=")
        xv, yv = _split_batch(self._next_val() if val_batch is None else val_batch)
        val_batch = {"x": xv.to(dev) if torch.is_tensor(xv) else xv, "y": yv.to(dev) if torch.is_tensor(yv) else yv}
        self._check_val_batch(val_batch)
        hparams = self.commentary.hparams()
        autocast_off = (torch.autocast(device_type=dev.type, enabled=False)
                        if dev.type in ("cpu", "cuda") else contextlib.nullcontext())
        reduce = None
        if self._dist():  # several processes: the hypergradient of the union of the shards
            from .distributed import ShardReducer

            reduce = ShardReducer(self.process_group, train_reduction=getattr(self.commentary, "reduction", "mean"),
                                  train_size=int(train_batch["x"].shape[0]), val_size=int(xv.shape[0]))
        fm.find_compiled()  # (a module.compile() since the last hyper-step: run eagerly as well)
        # Dropout/RReLU at their expectation: the engine needs one deterministic training loss
        with autocast_off, random_modules_eval(fm.module, self.commentary):
            res = implicit_hypergradient(
                train_loss, val_loss, fm.params(), hparams, train_batch, val_batch,
                solver=self._solver(), curvature=self.curvature, hvp=self.hvp, state=self._engine_state,
                reduce=reduce)
        return res

    def _check_val_batch(self, batch: dict) -> None:
        """``check_batch`` on a validation batch; under torch.distributed decided by all ranks
        together (a rank raising alone would leave the others waiting in the hyper-step's
        collectives), and a rank's empty shard is allowed (weighted 0)."""
        err = None
        try:
            if not (self._dist() and torch.is_tensor(batch["x"]) and batch["x"].dim() and batch["x"].shape[0] == 0):
                check_batch(batch["x"], batch["y"], getattr(self.commentary, "num_classes", None),
                            name="validation batch")
        except BatchError as e:
            if not self._dist():
                raise
            err = e
        if self._dist() and D.any_rank(err is not None, self.process_group):
            raise err or BatchError("the validation batch of another rank is invalid (its error says why)")

    def hyper_step(self, train_batch: dict | None = None, val_batch: Any = None):
        """One hyper-step on the commentary; returns the engine's result (None when a
        non-finite validation loss or training gradient made ``nan_policy="skip"`` skip it)."""
        try:
            res = self.hypergradient(train_batch, val_batch)
        except NonFiniteError:  # NaN/Inf in the validation loss or g_T (the engine's diagnosis)
            if self.nan_policy == "raise":
                raise
            self.skipped_hyper_steps += 1
            return None
        self.last_hyper = res
        named = dict(self.commentary.named_parameters())
        finite = all(bool(torch.isfinite(g).all()) for g in res.grads.values())
        if not finite:
            if self.nan_policy == "raise":
                raise NonFiniteError(f"non-finite hypergradient at step {self.steps} (nan_policy='raise')")
            self.skipped_hyper_steps += 1
            return res
        self.hyper_optimizer.zero_grad(set_to_none=True)
        for n, g in res.grads.items():
            named[n].grad = g.to(named[n].dtype).clone()
        before = {n: p.detach().clone() for n, p in named.items() if n in res.grads}
        self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for n, p in named.items() if n in before):
            # e.g. Adam on float16 parameters: its eps=1e-8 is 0 there, and 0/0 is NaN
            with torch.no_grad():
                for n, p in before.items():
                    named[n].copy_(p)
            dts = sorted({str(p.dtype) for p in before.values()})
            msg = (f"the hyper-optimizer's step made the commentary's parameters ({', '.join(dts)}) non-finite at step "
                   f"{self.steps}; they were restored. With float16 parameters keep the commentary in float32 (or "
                   "give the hyper-optimizer an eps that float16 holds)")
            if self.nan_policy == "raise":
                raise NonFiniteError(msg + " (nan_policy='raise')")
            self.skipped_hyper_steps += 1
            return res
        self.hyper_steps += 1
        return res

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``optimizer`` is the wrapped optimizer's own ``torch.optim`` state dict."""
        sd = {"optimizer": self.optimizer.state_dict(), "steps": self.steps, "hyper_steps": self.hyper_steps,
              "skipped_steps": self.skipped_steps, "skipped_hyper_steps": self.skipped_hyper_steps,
              "amp_skipped_steps": self.amp_skipped_steps}
        if self.commentary is not None:
            sd["commentary"] = self.commentary.state_dict()
        if self.hyper_optimizer is not None:
            sd["hyper_optimizer"] = self.hyper_optimizer.state_dict()
        if self._engine_state is not None and self._engine_state.lambda_max is not None:
            sd["lambda_max"] = self._engine_state.lambda_max
        if self._engine_state is not None:  # the power-iteration schedule, for a bit-exact resume
            es = self._engine_state
            sd["engine_state"] = {"calls": es.calls, "lambda_max": es.lambda_max, "estimated_at": es.estimated_at,
                                  "eigvec": None if es.eigvec is None else [t.detach().clone() for t in es.eigvec]}
        if self.scaler is not None and hasattr(self.scaler, "state_dict"):
            sd["scaler"] = self.scaler.state_dict()
        # where the hyper-steps are in val_loader / hyper_train_loader, and the blending draws
        sd["loader_positions"] = {"val_loader": self._taken["_val_iter"],
                                  "hyper_train_loader": self._taken["_train_iter"]}
        if self.generator is not None:
            sd["generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        for k in ("steps", "hyper_steps", "skipped_steps", "skipped_hyper_steps", "amp_skipped_steps"):
            setattr(self, k, int(sd.get(k, 0)))
        if "commentary" in sd and self.commentary is not None:
            self.commentary.load_state_dict(sd["commentary"])
        if "hyper_optimizer" in sd and self.hyper_optimizer is not None:
            self.hyper_optimizer.load_state_dict(sd["hyper_optimizer"])
        if "scaler" in sd and self.scaler is not None and hasattr(self.scaler, "load_state_dict"):
            self.scaler.load_state_dict(sd["scaler"])
        pos = sd.get("loader_positions", {})
        self._taken = {"_val_iter": int(pos.get("val_loader", 0)), "_train_iter": int(pos.get("hyper_train_loader", 0))}
        self._val_iter = self._train_iter = None  # made afresh at the next hyper-step, skipping those batches
        if "generator" in sd and self.generator is not None:
            self.generator.set_state(sd["generator"])
        if "engine_state" in sd or "lambda_max" in sd:
            from .engine import EngineState

            es = sd.get("engine_state") or {"lambda_max": sd["lambda_max"], "calls": 0, "estimated_at": 0}
            dev = next(iter(self.model.parameters())).device
            eig = es.get("eigvec")
            self._engine_state = EngineState(
                calls=int(es.get("calls", 0)),
                lambda_max=None if es.get("lambda_max") is None else float(es["lambda_max"]),
                eigvec=None if eig is None else [t.to(dev) for t in eig],
                estimated_at=int(es.get("estimated_at", -(10**9))))


def cycle(loader: Iterable):
    """Endless iteration over a re-iterable loader."""
    return itertools.chain.from_iterable(itertools.repeat(loader))
