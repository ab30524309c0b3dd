"""Shared helpers of the experiment scripts (python/exp_*.py)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    return p


def setup(args) -> Path:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("python " + " ".join(sys.argv) + "\n")
    return out


def ms(values) -> str:
    """'mean ± std' of a list (None entries are reported as a count)."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "n/a"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    extra = f" ({len(values) - len(vals)} of {len(values)} never)" if len(vals) < len(values) else ""
    return f"{m:.4g} ± {s:.2g}{extra}"


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o.tolist() if torch.is_tensor(o) else str(o)))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t0


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)
