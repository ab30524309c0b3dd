"""A small learning job for tests/test_checkpoint.py, run in a subprocess.

    python tests/_checkpoint_job.py JOB CKPT OUT [--every N] [--pause-after SAVES EXTRA_STEPS] [--pause-mid-write SAVE]

JOB: bptt | ift_blend | ift_weight | train.  CKPT "-": no checkpointing.
OUT: torch.save of the final commentary (and student / history / losses).
``--pause-after S E``: after the S-th checkpoint save and E further steps, print
"PAUSED" and sleep (the test SIGKILLs it there, between two checkpoints).
``--pause-mid-write S``: while writing the S-th checkpoint, after half of its
payload, print "MIDWRITE" and sleep (the test SIGKILLs it mid-write).
Prints "RESUMED <step> <file>" when it resumes from a checkpoint.
"""
import argparse
import os
import sys
import time
import warnings

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

from torch import nn  # noqa: E402

from commentaries_ext import checkpoint as ckpt_mod  # noqa: E402
from commentaries_ext.commentary import Blending, ExampleWeighting  # noqa: E402
from commentaries_ext.engine import HypergradientDivergenceWarning, NeumannConfig  # noqa: E402
from commentaries_ext.learn import learn_bptt, learn_ift, train_student  # noqa: E402


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, 4, generator=g) + nn.functional.one_hot(y, 4).float() * 2, y


def student():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--pause-after", type=int, nargs=2, default=None)
    ap.add_argument("--pause-mid-write", type=int, default=None)
    a = ap.parse_args()
    ck = None if a.ckpt == "-" else a.ckpt

    orig_load, orig_step_done, orig_write = (ckpt_mod.Checkpointer.load, ckpt_mod.Checkpointer.step_done,
                                             ckpt_mod._write_all)

    def load(self):
        st = orig_load(self)
        if st is not None:
            print(f"RESUMED {st['step']} {self.loaded_from}", flush=True)
        return st

    extra = {"n": None}

    def step_done(self, step, make_state):
        saved = orig_step_done(self, step, make_state)
        if a.pause_after is not None:
            if extra["n"] is not None:
                extra["n"] += 1
            elif saved and self.saves == a.pause_after[0]:
                extra["n"] = 0
            if extra["n"] is not None and extra["n"] >= a.pause_after[1]:
                print("PAUSED", flush=True)
                time.sleep(600)
        return saved

    writes = {"n": 0}

    def write_all(f, blob):
        writes["n"] += 1  # two calls per save: header, payload
        if a.pause_mid_write is not None and writes["n"] == 2 * a.pause_mid_write:
            orig_write(f, blob[: len(blob) // 2])
            f.flush()
            os.fsync(f.fileno())
            print("MIDWRITE", flush=True)
            time.sleep(600)
        orig_write(f, blob)

    ckpt_mod.Checkpointer.load = load
    ckpt_mod.Checkpointer.step_done = step_done
    ckpt_mod._write_all = write_all
    warnings.simplefilter("ignore", HypergradientDivergenceWarning)  # the Neumann fallback runs: fine here

    torch.manual_seed(0)
    kw = dict(checkpoint_path=ck, checkpoint_every=a.every)
    out = {}
    if a.job == "bptt":
        c = Blending(3)
        r = learn_bptt(c, student, data(), data(seed=1), inner_steps=3, outer_steps=8, inner_optimizer="adam",
                       inner_lr=0.1, outer_lr=0.1, batch_size=8, val_batch_size=8, same_init=False, **kw)
        out["history"] = r.history
    elif a.job == "ift_blend":
        c = Blending(3)
        r = learn_ift(c, student(), data(), data(seed=1), steps=14, batch_size=8, student_lr=0.05, hyper_lr=0.1,
                      val_batch_size=8, **kw)
        out["history"], out["student"] = r.history, r.student.state_dict()
    elif a.job == "ift_weight":
        c = ExampleWeighting(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)), num_classes=3,
                             reduction="mean", call="x")
        solver = NeumannConfig(K=3, alpha=None, reestimate_every=3, damping=0.1)
        r = learn_ift(c, student(), data(), data(seed=1), steps=14, batch_size=8,
                      student_optimizer=None, student_lr=0.05, hyper_lr=0.1, solver=solver, val_batch_size=8,
                      fresh_train_batch=True, **kw)
        out["history"], out["student"] = r.history, r.student.state_dict()
        out["skipped"] = r.skipped_steps
    elif a.job == "train":
        c = Blending(3)
        with torch.no_grad():
            c.phi.uniform_(-2.0, 2.0)
        s = student()
        out["losses"] = train_student(s, data(), commentary=c, steps=14, batch_size=8, lr=0.05, **kw)
        out["student"] = s.state_dict()
    else:
        sys.exit(f"unknown job {a.job}")
    out["commentary"] = c.state_dict()
    torch.save(out, a.out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
