"""Experiment 3: attention masks on the spurious-correlation variant of Fashion-MNIST.

Images are zero-padded to 36x36 and get a bright 4x4 square in the corner tied
to the label (label mod 4) in training and validation, in a random corner in
test.  For each seed: learn an AttentionMask (U-Net -> centroid -> Gaussian
mask, sigma 0.2, zeros background) by IFT while training a ConvNet; then train
fresh ConvNets (same initialisations) on plain images (baseline) and on masked
images (the learned mask, fixed), and compare test accuracy (random cue) and
validation accuracy (correlated cue).  Mask placement on the test images: the
mean mask value on the object's pixels against the cue's pixels, and how often
the centroid falls inside the 28x28 object box.

    python python/exp_masks.py --out runs/exp3_masks
"""
from __future__ import annotations

import torch

import exp_common as E
from commentaries_ext.cli import train_tracked
from commentaries_ext.commentary import AttentionMask
from commentaries_ext.data import cue_mask, load_dataset, spurious
from commentaries_ext.files import save_commentary
from commentaries_ext.learn import evaluate, learn_ift
from commentaries_ext.models import make_student


@torch.no_grad()
def placement(com, sp, n=1000):
    x = sp.test[0][:n]
    pos = sp.info["cue_pos"]["test"][:n]
    pad, size = sp.info["pad"], sp.info["cue_size"]
    com.eval()
    m, mu = com.masks(x)
    com.train()
    m = m[:, 0]
    cue = cue_mask(x.shape, pos, size)
    H = x.shape[-1]
    obj = torch.zeros_like(cue)
    obj[:, pad:H - pad, pad:H - pad] = x[:, 0, pad:H - pad, pad:H - pad] > 0.1
    obj &= ~cue
    m_obj = (m * obj).sum((1, 2)) / obj.sum((1, 2)).clamp_min(1)
    m_cue = (m * cue).sum((1, 2)) / cue.sum((1, 2)).clamp_min(1)
    lo, hi = pad / H, (H - pad) / H
    inside = ((mu >= lo) & (mu <= hi)).all(1)
    return {"frac_object_over_cue": float((m_obj > m_cue).float().mean()), "mask_on_object": float(m_obj.mean()),
            "mask_on_cue": float(m_cue.mean()), "frac_centroid_in_object_box": float(inside.float().mean()),
            "centroid_mean": mu.mean(0).tolist(), "centroid_std": mu.std(0).tolist()}


def main():
    p = E.parser(__doc__, "runs/exp3_masks")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--learn-steps", type=int, default=300)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--inits", type=int, default=2)
    args = p.parse_args()
    out = E.setup(args)
    if args.quick:
        args.train_size, args.val_size, args.learn_steps, args.train_steps, args.inits = 300, 200, 10, 20, 1
    results = []
    for seed in args.seeds:
        sp = spurious(load_dataset("fashion-mnist", seed=seed, train_size=args.train_size, val_size=args.val_size),
                      seed=seed, size=4)
        torch.manual_seed(seed)
        com = AttentionMask(1, num_classes=10, sigma=0.2, background="zeros")
        before = placement(com, sp)
        with E.Timer() as t:
            res = learn_ift(com, make_student("convnet", sp.input_shape, 10), sp.train, sp.val,
                            steps=args.learn_steps, batch_size=32, student_lr=1e-3, hyper_lr=1e-3, hyper_every=1,
                            val_batch_size=128, seed=seed, nan_policy="skip", log_every=max(1, args.learn_steps // 20),
                            callback=lambda s, r: (s % 50 == 0) and E.log(f"seed {seed} ift step {s} {r}"))
        learn_seconds = t.seconds
        path = out / f"fmnist-spurious-mask-seed{seed}.commentary"
        save_commentary(path, com, data=sp.train,
                        learned_with=dict(res.learned_with(), dataset="fashion-mnist+spurious", seconds=learn_seconds))
        after = placement(com, sp)
        if seed == args.seeds[0]:
            import matplotlib.pyplot as plt

            fig = com.plot(sp.test[0][:10], max_images=10, title="learned masks on test images (random cue corner)")
            fig.savefig(out / "masks.png", dpi=110)
            plt.close(fig)
        torch.manual_seed(seed)
        untrained = AttentionMask(1, num_classes=10, sigma=0.2, background="zeros")
        runs = {"baseline": [], "masked": [], "untrained_mask": []}
        for k in range(args.inits):
            torch.manual_seed(10_000 * (seed + 1) + k)
            init = make_student("convnet", sp.input_shape, 10).state_dict()
            for name, c in (("baseline", None), ("masked", com), ("untrained_mask", untrained)):
                st = make_student("convnet", sp.input_shape, 10)
                st.load_state_dict(init)
                r = train_tracked(st, sp, commentary=c, steps=args.train_steps, batch_size=32, lr=1e-3,
                                  seed=seed * 100 + k, eval_every=max(1, args.train_steps // 5), quiet=True)
                runs[name].append({"test": evaluate(st, sp.test)["accuracy"], "val": r["final"]["val_accuracy"],
                                   "seconds": r["seconds"]})
        rec = {"seed": seed, "learn_seconds": learn_seconds, "placement_before": before, "placement_after": after,
               "runs": runs, "learner_student_test": evaluate(res.student, sp.test)["accuracy"],
               "skipped": res.skipped_steps, "val_loss_history": [h.get("val_loss") for h in res.history]}
        results.append(rec)
        E.log(f"seed {seed}: placement {after}; " + ", ".join(
            f"{n} test {sum(x['test'] for x in v) / len(v):.4f}" for n, v in runs.items()))
        E.dump(out / "results.json", {"args": vars(args), "results": results})

    def per_seed(name, key):
        return [sum(x[key] for x in r["runs"][name]) / len(r["runs"][name]) for r in results]

    lines = [f"train {args.train_size} / val {args.val_size} (cue tied to label) / test 10000 (random cue), "
             f"36x36 with a 4x4 cue, {args.train_steps} student steps, IFT mask learning {args.learn_steps} steps",
             "| student | test acc (random cue) | val acc (correlated cue) |", "|---|---|---|",
             f"| baseline (plain images) | {E.ms(per_seed('baseline', 'test'))} | {E.ms(per_seed('baseline', 'val'))} |",
             f"| masked (learned mask) | {E.ms(per_seed('masked', 'test'))} | {E.ms(per_seed('masked', 'val'))} |",
             f"| masked (untrained mask, same init as learned) | {E.ms(per_seed('untrained_mask', 'test'))} | "
             f"{E.ms(per_seed('untrained_mask', 'val'))} |",
             "", "| mask placement on 1000 test images | untrained mask | learned mask |", "|---|---|---|"]
    for key in ("frac_object_over_cue", "mask_on_object", "mask_on_cue", "frac_centroid_in_object_box"):
        lines.append(f"| {key} | {E.ms([r['placement_before'][key] for r in results])} | "
                     f"{E.ms([r['placement_after'][key] for r in results])} |")
    lines.append(f"\nlearning time {E.ms([r['learn_seconds'] for r in results])} s; skipped {[r['skipped'] for r in results]}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
