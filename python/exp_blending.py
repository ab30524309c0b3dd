"""Experiment 2: label-dependent blending augmentation learned by IFT on Fashion-MNIST.

For each seed: learn the C x C blending matrix (init -1) by implicit
differentiation (Neumann K=1, a hyper-step after every student step, Adam
1e-2, validation batches of 128 never blended) while training a ConvNet; then
train fresh ConvNets (the same initialisation for every policy) with no
blending, random lambda ~ U(0.5, 1), mixup (lambda ~ Beta(1, 1)) and the
learned matrix (fixed), and report their test accuracy after the same number
of steps (the last step; nothing is selected on the test split).

    python python/exp_blending.py --out runs/exp2_blending
"""
from __future__ import annotations

import torch

import exp_common as E
from commentaries_ext.cli import train_tracked
from commentaries_ext.commentary import Blending
from commentaries_ext.data import FASHION_MNIST_CLASSES, load_dataset
from commentaries_ext.files import save_commentary
from commentaries_ext.learn import evaluate, learn_ift
from commentaries_ext.models import make_student

POLICIES = ("none", "random", "mixup", "learned")


def main():
    p = E.parser(__doc__, "runs/exp2_blending")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--learn-steps", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--inits", type=int, default=2, help="student initialisations per seed")
    args = p.parse_args()
    out = E.setup(args)
    if args.quick:
        args.train_size, args.val_size, args.learn_steps, args.train_steps, args.inits = 300, 200, 20, 20, 1
    results = []
    mats = []
    for seed in args.seeds:
        splits = load_dataset("fashion-mnist", seed=seed, train_size=args.train_size, val_size=args.val_size)
        torch.manual_seed(seed)
        com = Blending(splits.num_classes)
        with E.Timer() as t:
            res = learn_ift(com, make_student("convnet", splits.input_shape, splits.num_classes), splits.train,
                            splits.val, steps=args.learn_steps, batch_size=32, student_lr=1e-3, hyper_lr=1e-2,
                            hyper_every=1, val_batch_size=128, seed=seed, nan_policy="skip",
                            log_every=max(1, args.learn_steps // 20),
                            callback=lambda s, r: (s % 100 == 0) and E.log(f"seed {seed} ift step {s} {r}"))
        learn_seconds = t.seconds
        learner_test = evaluate(res.student, splits.test)["accuracy"]
        path = out / f"fmnist-blending-seed{seed}.commentary"
        save_commentary(path, com, data=splits.train,
                        learned_with=dict(res.learned_with(), dataset="fashion-mnist", seconds=learn_seconds))
        mats.append(com.matrix())
        runs = {pol: [] for pol in POLICIES}
        for k in range(args.inits):
            torch.manual_seed(10_000 * (seed + 1) + k)
            init = make_student("convnet", splits.input_shape, splits.num_classes).state_dict()
            for pol in POLICIES:
                c = com if pol == "learned" else Blending(splits.num_classes, policy=pol)
                st = make_student("convnet", splits.input_shape, splits.num_classes)
                st.load_state_dict(init)
                r = train_tracked(st, splits, commentary=c, steps=args.train_steps, batch_size=32, lr=1e-3,
                                  seed=seed * 100 + k, eval_every=max(1, args.train_steps // 10), quiet=True)
                r["test"] = evaluate(st, splits.test)["accuracy"]
                runs[pol].append({"test": r["test"], "final_val": r["final"]["val_accuracy"], "curve": r["curve"],
                                  "seconds": r["seconds"]})
        rec = {"seed": seed, "learn_seconds": learn_seconds, "learner_student_test": learner_test,
               "matrix": com.matrix().tolist(), "runs": runs, "skipped": res.skipped_steps,
               "skipped_info": {k: v for k, v in res.info.items() if k.startswith("skipped")},
               "val_loss_history": [h.get("val_loss") for h in res.history], "commentary": str(path)}
        results.append(rec)
        E.log(f"seed {seed}: " + ", ".join(f"{pol} {sum(x['test'] for x in runs[pol]) / len(runs[pol]):.4f}"
                                           for pol in POLICIES))
        E.dump(out / "results.json", {"args": vars(args), "results": results})

    # heatmap of the mean learned matrix
    import matplotlib.pyplot as plt

    mean = torch.stack(mats).mean(0)
    c = Blending(10)
    with torch.no_grad():
        c.phi.copy_(torch.logit(2 * (1 - mean.clamp(0.5 + 1e-6, 1 - 1e-6))))
    fig = c.plot(FASHION_MNIST_CLASSES, title=f"learned lambda, mean of {len(mats)} seeds")
    fig.savefig(out / "blending_matrix.png", dpi=110)
    plt.close(fig)

    per_seed = {pol: [sum(x["test"] for x in r["runs"][pol]) / len(r["runs"][pol]) for r in results]
                for pol in POLICIES}
    lines = [f"train {args.train_size} / val {args.val_size} / test 10000, {args.train_steps} student steps, "
             f"IFT learning {args.learn_steps} steps, {args.inits} student inits per seed",
             "| policy | test accuracy (mean ± std over seeds) |", "|---|---|"]
    for pol in POLICIES:
        lines.append(f"| {pol} | {E.ms(per_seed[pol])} |")
    lines.append(f"| (the student trained while learning, IFT) | {E.ms([r['learner_student_test'] for r in results])} |")
    lines.append(f"\nlearning time {E.ms([r['learn_seconds'] for r in results])} s; skipped steps "
                 f"{[r['skipped'] for r in results]}")
    names = FASHION_MNIST_CLASSES
    off = [(float(mean[i, j]), names[i], names[j]) for i in range(10) for j in range(10) if i != j]
    off.sort()
    diag = [float(mean[i, i]) for i in range(10)]
    lines.append(f"\nmean lambda: diagonal {sum(diag) / 10:.3f}, off-diagonal {sum(o[0] for o in off) / len(off):.3f}; "
                 f"range {float(mean.min()):.3f} .. {float(mean.max()):.3f} (init 0.866)")
    lines.append("most blending (smallest lambda): " + "; ".join(f"{a} <- {b} {v:.3f}" for v, a, b in off[:5]))
    lines.append("least blending (largest lambda): " + "; ".join(f"{a} <- {b} {v:.3f}" for v, a, b in off[-5:]))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
