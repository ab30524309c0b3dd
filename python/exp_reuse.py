"""Experiment 4: the cost of training with a stored commentary against learning it afresh.

Reads the commentary files and results of experiments 1 and 2 (run those
first).  For each seed's file: time ``load_commentary`` (including the data
fingerprint check), then train a fresh ConvNet for the same number of steps
with the loaded commentary and without one; compare with the wall-clock time
that learning the commentary took (recorded by experiments 1 and 2; all runs
single-threaded on the same shared machine).

    python python/exp_reuse.py --exp1 runs/exp1_weighting --exp2 runs/exp2_blending --out runs/exp4_reuse
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import exp_common as E
from commentaries_ext.cli import train_tracked
from commentaries_ext.data import load_dataset
from commentaries_ext.commentary import Blending, ExampleWeighting
from commentaries_ext.files import load_commentary
from commentaries_ext.learn import learn_bptt, learn_ift
from commentaries_ext.models import make_student


def main():
    p = E.parser(__doc__, "runs/exp4_reuse")
    p.add_argument("--exp1", default="runs/exp1_weighting")
    p.add_argument("--exp2", default="runs/exp2_blending")
    p.add_argument("--relearn", action="store_true",
                   help="time learning afresh here too (same conditions as the reuse timings) instead of using "
                        "the times recorded by experiments 1 and 2")
    args = p.parse_args()
    out = E.setup(args)
    rows = {}
    for name, folder, steps_key in (("weighting (BPTT)", args.exp1, "inner_steps"),
                                    ("blending (IFT)", args.exp2, "train_steps")):
        f = Path(folder) / "results.json"
        if not f.exists():
            E.log(f"skip {name}: no {f}")
            continue
        R = json.loads(f.read_text())
        steps = int(R["args"][steps_key])
        recs = []
        for r in R["results"]:
            seed = r["seed"]
            splits = load_dataset("fashion-mnist", seed=seed, train_size=R["args"]["train_size"],
                                  val_size=R["args"]["val_size"])
            path = next(Path(folder).glob(f"*seed{seed}.commentary"))
            with E.Timer() as tl:
                com = load_commentary(path, data=splits.train)
            torch.manual_seed(seed)
            init = make_student("convnet", splits.input_shape, 10).state_dict()
            times = {}
            for k, c in (("plain", None), ("with", com)):
                st = make_student("convnet", splits.input_shape, 10)
                st.load_state_dict(init)
                res = train_tracked(st, splits, commentary=c, steps=steps, batch_size=32, seed=seed,
                                    eval_every=steps, quiet=True)
                times[k] = res["seconds"]
            relearn = None
            if args.relearn:
                A = R["args"]
                with E.Timer() as tr:
                    if name.startswith("weighting"):
                        c2 = ExampleWeighting.reference(splits.input_shape, 10, reduction="mean")
                        learn_bptt(c2, lambda: make_student("convnet", splits.input_shape, 10), splits.train,
                                   splits.val, inner_steps=A["inner_steps"], inner_lr=1e-3,
                                   outer_steps=A["outer_steps"], outer_lr=A["outer_lr"], batch_size=32,
                                   same_init=False, val_batch_size=500, seed=seed, nan_policy="skip")
                    else:
                        learn_ift(Blending(10), make_student("convnet", splits.input_shape, 10), splits.train,
                                  splits.val, steps=A["learn_steps"], batch_size=32, student_lr=1e-3, hyper_lr=1e-2,
                                  val_batch_size=128, seed=seed, nan_policy="skip")
                relearn = tr.seconds
            recs.append({"seed": seed, "learn_seconds": relearn if relearn is not None else r["learn_seconds"],
                         "learn_seconds_recorded": r["learn_seconds"], "load_seconds": tl.seconds,
                         "train_plain_seconds": times["plain"], "train_with_seconds": times["with"], "steps": steps})
            E.log(name, recs[-1])
        rows[name] = recs
    E.dump(out / "results.json", rows)
    lines = ["| commentary | student steps | learn afresh (s) | load stored (s) | train with stored (s) "
             "| train without (s) | learn / (load + train with) |", "|---|---|---|---|---|---|---|"]
    for name, recs in rows.items():
        ratio = [r["learn_seconds"] / (r["load_seconds"] + r["train_with_seconds"]) for r in recs]
        lines.append(f"| {name} | {recs[0]['steps']} | {E.ms([r['learn_seconds'] for r in recs])} | "
                     f"{E.ms([r['load_seconds'] for r in recs])} | {E.ms([r['train_with_seconds'] for r in recs])} | "
                     f"{E.ms([r['train_plain_seconds'] for r in recs])} | {E.ms(ratio)} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
