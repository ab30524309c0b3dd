"""Experiment 1: example weighting learned by BPTT on Fashion-MNIST.

For each seed: learn the reference teacher (ExampleWeighting, progress channel,
mean reduction) by backpropagation through ``--inner-steps`` Adam steps of the
reference ConvNet student; then train fresh students for the same number of
steps with and without it (several initialisations per seed, the same ones for
both) and record the first step at which the validation accuracy reaches the
baseline's final validation accuracy.  The same commentary is then reused on a
different architecture (SmallResNet) without relearning.  Test accuracy is
reported, never used for choices.

    python python/exp_weighting.py --out runs/exp1_weighting
"""
from __future__ import annotations

import statistics

import torch

import exp_common as E
from commentaries_ext.cli import train_tracked
from commentaries_ext.commentary import ExampleWeighting
from commentaries_ext.data import load_dataset
from commentaries_ext.files import save_commentary
from commentaries_ext.learn import evaluate, learn_bptt
from commentaries_ext.models import make_student


def run_students(splits, arch, commentary, steps, inits, seed, eval_every):
    """Baseline and commentary students from the same initialisations."""
    rows = []
    for k in range(inits):
        torch.manual_seed(10_000 * (seed + 1) + k)
        init = make_student(arch, splits.input_shape, splits.num_classes).state_dict()
        res = {}
        for name, com in (("baseline", None), ("commentary", commentary)):
            st = make_student(arch, splits.input_shape, splits.num_classes)
            st.load_state_dict(init)
            tgt = res["baseline"]["final"]["val_accuracy"] if name == "commentary" else None
            r = train_tracked(st, splits, commentary=com, steps=steps, batch_size=32, lr=1e-3, seed=seed * 100 + k,
                              eval_every=eval_every, quiet=True, target=tgt)
            r["test"] = evaluate(st, splits.test)
            res[name] = r
        b = res["baseline"]
        tgt = b["final"]["val_accuracy"]
        b["steps_to_target"] = next(s for s, a, _ in b["curve"] if a >= tgt)
        rows.append({"target": tgt, "baseline_steps": b["steps_to_target"],
                     "commentary_steps": res["commentary"]["steps_to_target"],
                     "baseline_final_val": tgt, "commentary_final_val": res["commentary"]["final"]["val_accuracy"],
                     "baseline_test": b["test"]["accuracy"], "commentary_test": res["commentary"]["test"]["accuracy"],
                     "baseline_curve": b["curve"], "commentary_curve": res["commentary"]["curve"],
                     "baseline_seconds": b["seconds"], "commentary_seconds": res["commentary"]["seconds"]})
    return rows


def main():
    p = E.parser(__doc__, "runs/exp1_weighting")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--inner-steps", type=int, default=80)
    p.add_argument("--outer-steps", type=int, default=20)
    p.add_argument("--outer-lr", type=float, default=3e-3)
    p.add_argument("--inits", type=int, default=3, help="student initialisations per seed")
    p.add_argument("--reuse-arch", default="resnet")
    p.add_argument("--summarize", action="store_true", help="only rebuild summary.md from results.json")
    args = p.parse_args()
    if args.summarize:
        import json
        from pathlib import Path

        R = json.loads((Path(args.out) / "results.json").read_text())
        return summarize(Path(args.out), argparse_ns(R["args"]), R["results"])
    out = E.setup(args)
    if args.quick:
        args.train_size, args.val_size, args.inner_steps, args.outer_steps, args.inits = 500, 200, 10, 2, 1
    T = args.inner_steps
    ev = max(1, T // 20)
    results = []
    for seed in args.seeds:
        splits = load_dataset("fashion-mnist", seed=seed, train_size=args.train_size, val_size=args.val_size)
        torch.manual_seed(seed)
        com = ExampleWeighting.reference(splits.input_shape, splits.num_classes, reduction="mean")
        factory = lambda: make_student("convnet", splits.input_shape, splits.num_classes)  # noqa: E731
        with E.Timer() as t:
            res = learn_bptt(com, factory, splits.train, splits.val, inner_steps=T, inner_optimizer="adam",
                             inner_lr=1e-3, outer_steps=args.outer_steps, outer_lr=args.outer_lr, batch_size=32,
                             same_init=False, val_batch_size=500, seed=seed, nan_policy="skip",
                             callback=lambda s, r: E.log(f"seed {seed} outer {s} val_loss {r['val_loss']:.4f}"))
        learn_seconds = t.seconds
        path = out / f"fmnist-weighting-seed{seed}.commentary"
        save_commentary(path, com, data=splits.train,
                        learned_with=dict(res.learned_with(), dataset="fashion-mnist", seconds=learn_seconds))
        if seed == args.seeds[0]:
            import matplotlib.pyplot as plt

            # the weights as the students receive them: training mode (the teacher's BatchNorm on each
            # batch's statistics), batches of the students' 32
            fig = com.plot(splits.val[0][:1000], splits.val[1][:1000], progress=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                           title="learned example weights (Fashion-MNIST, seed %d)" % seed, batch_size=32)
            fig.savefig(out / "weights.png", dpi=110)
            plt.close(fig)
            # per-class mean weight against progress, as numbers
            table = {}
            for prog in (0.0, 0.25, 0.5, 0.75, 1.0):
                w = com.weights(splits.val[0][:1000], splits.val[1][:1000], progress=prog, batch_size=32)
                table[prog] = [float(w[splits.val[1][:1000] == c].mean()) for c in range(splits.num_classes)]
        else:
            table = None
        conv = run_students(splits, "convnet", com, T, args.inits, seed, ev)
        reuse = run_students(splits, args.reuse_arch, com, T, args.inits, seed, ev)
        rec = {"seed": seed, "learn_seconds": learn_seconds, "history": res.history, "convnet": conv,
               "reuse": reuse, "reuse_arch": args.reuse_arch, "weights_by_class": table, "commentary": str(path),
               "skipped": res.skipped_steps}
        results.append(rec)
        E.log(f"seed {seed}: learn {learn_seconds:.0f}s; convnet steps baseline "
              f"{[r['baseline_steps'] for r in conv]} commentary {[r['commentary_steps'] for r in conv]}")
        E.dump(out / "results.json", {"args": vars(args), "results": results})
    summarize(out, args, results)


def argparse_ns(d):
    import argparse

    return argparse.Namespace(**d)


def summarize(out, args, results):
    T = args.inner_steps
    ev = max(1, T // 20)

    def agg(key, arch):
        # per seed: mean over initialisations (never reached -> T + 1 counted separately)
        vals = []
        for r in results:
            xs = [row[key] for row in r[arch]]
            xs = [x for x in xs if x is not None]
            vals.append(statistics.fmean(xs) if xs else None)
        return vals

    lines = [f"inner/training steps T = {T}, evaluation every {ev} steps, {args.inits} student inits per seed",
             "| student | steps to baseline's final val acc: baseline | with commentary | never reached (runs) "
             "| final val acc baseline | with commentary | test acc baseline | with commentary |",
             "|---|---|---|---|---|---|---|---|"]
    for arch in ("convnet", "reuse"):
        never = sum(row["commentary_steps"] is None for r in results for row in r[arch])
        total = sum(len(r[arch]) for r in results)
        name = "ConvNet (learned on)" if arch == "convnet" else f"{args.reuse_arch} (reuse)"
        lines.append(f"| {name} | {E.ms(agg('baseline_steps', arch))} | {E.ms(agg('commentary_steps', arch))} | "
                     f"{never}/{total} | {E.ms(agg('baseline_final_val', arch))} | "
                     f"{E.ms(agg('commentary_final_val', arch))} | {E.ms(agg('baseline_test', arch))} | "
                     f"{E.ms(agg('commentary_test', arch))} |")
    vl0 = [r["history"][0]["val_loss"] for r in results]
    vl1 = [r["history"][-1]["val_loss"] for r in results]
    lines.append(f"\nBPTT validation loss, first -> last outer step: {E.ms(vl0)} -> {E.ms(vl1)}; "
                 f"learning time {E.ms([r['learn_seconds'] for r in results])} s")
    wt = results[0]["weights_by_class"]
    if wt:
        lines.append("\nmean learned weight per class (seed %d, 1000 validation images in batches of 32, in "
                     "training mode as the students receive them) against progress i/T:\n" % results[0]["seed"])
        lines.append("| i/T | " + " | ".join(str(c) for c in range(10)) + " |")
        lines.append("|---" * 11 + "|")
        for prog, ws in wt.items():
            lines.append(f"| {prog} | " + " | ".join(f"{w:.3f}" for w in ws) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
