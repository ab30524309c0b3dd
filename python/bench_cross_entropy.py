"""Micro-benchmark of the weighted softmax cross-entropy on the CPU.

For N=8192 and C in {10, 100, 1000} (float32), in one run:

* forward+backward of ``sum_i w_i CE(z_i, y_i)`` (gradient w.r.t. the logits):
  eager PyTorch (``F.cross_entropy(reduction="none") * w``, sum, backward),
  ``torch.compile`` of the same, and ``weighted_cross_entropy`` on each backend
  (for the CPU backends also "two-pass": without the fused reduced path, i.e. the
  forward kernel then the backward kernel);
* the loss-HVP ``w_i H_i u_i`` w.r.t. the logits: eager double backward vs
  ``cross_entropy_hvp`` on each backend ("two-pass": the lse by the forward kernel,
  then wce_hvp, instead of the one-pass wce_softmax_hvp);
* the copy bandwidth (``Tensor.copy_`` of a 64 MB buffer, read + write) and the
  bandwidth achieved by the C=1000 forward+backward (read the logits once,
  write the gradient once).

Medians over ``--repeats`` timed calls after warm-up. Usage::

    python python/bench_cross_entropy.py [--backends cpp,reference] [--repeats 50] [--threads T] [--keep-freed-memory] [--json out.json] [--no-compile]
    python python/bench_cross_entropy.py --kernel-sweep [--threads T]
    python python/bench_cross_entropy.py --fixed-cost [--threads T]

``--kernel-sweep`` instead times the C++ one-pass kernels alone (``cpp_wce_forward_grad`` and
``cpp_wce_softmax_hvp``, float32, 819,200 logits reshaped to each C) on 1 thread and on T threads:
the per-row costs show as the time growing when C shrinks at a fixed element count.

``--fixed-cost`` times a small batch's forward + backward (N = 128, weighted sum and plain mean)
three ways, round-robin: eager PyTorch, the cpp backend through the Python ``_ReducedCE``
Function, and through the C++ autograd op ``cpp_wce_reduced`` (what runs by default).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import commentaries_ext  # noqa: F401
from commentaries_ext import backend
from commentaries_ext.ops import cross_entropy as ce


MINS: dict = {}


def timeit(fn, repeats: int, warmup: int = 5, key=None) -> float:
    """Median seconds; the minimum goes to ``MINS[key]`` (a shared machine stalls threads)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if key is not None:
        MINS[key] = min(times)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    src = torch.empty(16 * 1024 * 1024, dtype=torch.float32).uniform_()  # 64 MB
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / t  # bytes/s (read + write)


def eager_loss(z, y, w):
    return (F.cross_entropy(z, y, reduction="none") * w).sum()


def kernel_sweep(threads: int, repeats: int) -> None:
    ops = torch.ops.commentaries_ext
    classes = (10, 16, 24, 32, 64, 96, 100, 128, 256, 1000)
    print(f"C++ kernels alone, float32, 819,200 logits as [N, C]; median / min ms of {repeats}")
    print("| kernel | threads | " + " | ".join(f"C={c}" for c in classes) + " |")
    print("|---|---|" + "---|" * len(classes))
    for name in ("cpp_wce_forward_grad", "cpp_wce_softmax_hvp"):
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            cells = []
            for c in classes:
                g = torch.Generator().manual_seed(c)
                n = 819200 // c
                z = torch.randn(n, c, generator=g)
                y = torch.randint(0, c, (n,), generator=g)
                w = torch.rand(n, generator=g)
                u = torch.randn(n, c, generator=g)
                if name == "cpp_wce_forward_grad":
                    fn = (lambda: ops.cpp_wce_forward_grad(z, y, None, None, w, -100))
                else:
                    fn = (lambda: ops.cpp_wce_softmax_hvp(z, w, u))
                med = timeit(fn, repeats, key=("sweep", name, t, c))
                cells.append(f"{med * 1e3:.3f} / {MINS[('sweep', name, t, c)] * 1e3:.3f}")
            print(f"| {name} | {t} | " + " | ".join(cells) + " |")


def fixed_cost(repeats: int) -> None:
    """Small-batch forward + backward, microseconds (medians of round-robin rounds)."""
    def python_function(fn):  # the cpp backend without its C++ autograd op
        def run():
            saved, ce._CPP_REDUCED = ce._CPP_REDUCED, None
            try:
                fn()
            finally:
                ce._CPP_REDUCED = saved
        return run

    print(f"forward + backward w.r.t. the logits, N = 128 float32; median us of {repeats} round-robin rounds")
    print("| C | loss | eager | cpp, Python Function | cpp, C++ autograd op | C++ op vs Python Function | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for c in (10, 100):
        g = torch.Generator().manual_seed(c)
        z = torch.randn(128, c, generator=g).requires_grad_()
        y = torch.randint(0, c, (128,), generator=g)
        w = torch.rand(128, generator=g)
        for loss, eager, ours in (
            ("weighted sum", lambda: (F.cross_entropy(z, y, reduction="none") * w).sum(),
             lambda: ce.weighted_cross_entropy(z, y, w, reduction="sum")),
            ("mean", lambda: F.cross_entropy(z, y), lambda: ce.weighted_cross_entropy(z, y)),
        ):
            def fb(f=ours):
                torch.autograd.grad(f(), z)
            fns = {"eager": lambda f=eager: torch.autograd.grad(f(), z), "python": python_function(fb), "cpp": fb}
            with backend.use("cpp"):
                for f in fns.values():
                    for _ in range(50):
                        f()
                times = {k: [] for k in fns}
                for _ in range(repeats):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(20):
                            f()
                        times[k].append((time.perf_counter() - t0) / 20 * 1e6)
            m = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {c} | {loss} | {m['eager']:.1f} | {m['python']:.1f} | {m['cpp']:.1f} | "
                  f"{m['python'] / m['cpp']:.2f}x | {m['eager'] / m['cpp']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default=",".join(b for b in backend.candidates("wce_forward", "cpu") if b != "triton"),
                    help="comma-separated backends to time (default: the CPU ones present)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc mallopt: keep freed memory in the process (as a caching allocator does), so that "
                         "fresh [N, C] outputs do not pay first-touch page faults; applies to every method alike")
    ap.add_argument("--kernel-sweep", action="store_true", help="time the C++ fused kernel alone over C (see above)")
    ap.add_argument("--fixed-cost", action="store_true", help="small-batch per-call cost (see above)")
    args = ap.parse_args()
    if args.fixed_cost:
        if args.threads:
            torch.set_num_threads(args.threads)
        fixed_cost(args.repeats)
        return
    if args.kernel_sweep:
        kernel_sweep(args.threads or torch.get_num_threads(), args.repeats)
        return
    if args.keep_freed_memory:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    n = args.n
    results: dict = {"n": n, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": []}

    bw = copy_bandwidth(args.repeats)
    results["copy_GBps"] = bw / 1e9
    compiled = None if args.no_compile else torch.compile(eager_loss)

    for c in (int(v) for v in args.classes.split(",")):
        g = torch.Generator().manual_seed(c)
        z = torch.randn(n, c, generator=g).requires_grad_()
        y = torch.randint(0, c, (n,), generator=g)
        w = torch.rand(n, generator=g)
        u = torch.randn(n, c, generator=g)
        row: dict = {"C": c, "fwd_bwd_ms": {}, "hvp_ms": {}}

        def fb_eager():
            torch.autograd.grad(eager_loss(z, y, w), z)

        def hvp_eager():
            (gz,) = torch.autograd.grad(eager_loss(z, y, w), z, create_graph=True)
            torch.autograd.grad(gz, z, u)

        row["fwd_bwd_ms"]["eager"] = timeit(fb_eager, args.repeats, key=(c, "fwd_bwd_ms", "eager")) * 1e3
        if compiled is not None:
            def fb_compile():
                torch.autograd.grad(compiled(z, y, w), z)
            row["fwd_bwd_ms"]["compile"] = timeit(fb_compile, args.repeats, key=(c, "fwd_bwd_ms", "compile")) * 1e3
        row["hvp_ms"]["eager"] = timeit(hvp_eager, max(5, args.repeats // 2), key=(c, "hvp_ms", "eager")) * 1e3
        zd = z.detach()
        for b in backends:
            with backend.use(b):
                def fb_ours():
                    torch.autograd.grad(ce.weighted_cross_entropy(z, y, w, reduction="sum"), z)

                def hvp_ours():
                    ce.cross_entropy_hvp(zd, u, w)

                row["fwd_bwd_ms"][b] = timeit(fb_ours, args.repeats, key=(c, "fwd_bwd_ms", b)) * 1e3
                row["hvp_ms"][b] = timeit(hvp_ours, args.repeats, key=(c, "hvp_ms", b)) * 1e3
                if ce._fused_kernel(z.device) is not None:  # the same backend without its fused ops
                    fused, ce._fused_kernel = ce._fused_kernel, (lambda device, op="": None)
                    try:
                        row["fwd_bwd_ms"][b + " two-pass"] = timeit(
                            fb_ours, args.repeats, key=(c, "fwd_bwd_ms", b + " two-pass")) * 1e3
                        row["hvp_ms"][b + " two-pass"] = timeit(
                            hvp_ours, args.repeats, key=(c, "hvp_ms", b + " two-pass")) * 1e3
                    finally:
                        ce._fused_kernel = fused
        nbytes = 2 * n * c * z.element_size()
        row["fwd_bwd_GBps"] = {k: nbytes / (v * 1e-3) / 1e9 for k, v in row["fwd_bwd_ms"].items()}
        row["min_ms"] = {f"{kind}/{name}": MINS[(c, kind, name)] * 1e3 for kind in ("fwd_bwd_ms", "hvp_ms")
                         for name in row[kind]}
        results["rows"].append(row)

    results["keep_freed_memory"] = bool(args.keep_freed_memory)
    print(f"N={n} float32, {results['threads']} threads, torch {torch.__version__}; medians of {args.repeats}; "
          f"keep-freed-memory {bool(args.keep_freed_memory)}")
    print(f"copy bandwidth (64 MB copy_, read+write): {results['copy_GBps']:.1f} GB/s")
    for kind in ("fwd_bwd_ms", "hvp_ms"):
        print(f"\n{kind.replace('_ms', '')} (ms; speed-up vs eager" + (", vs compile)" if kind == "fwd_bwd_ms" and
                                                                             compiled is not None else ")"))
        names = list(results["rows"][0][kind].keys())
        print("| C | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for row in results["rows"]:
            cells = []
            for k in names:
                t = row[kind][k]
                cell = f"{t:.3f}"
                if k not in ("eager", "compile"):  # ours: vs eager (and vs compile)
                    cell += f" ({row[kind]['eager'] / t:.1f}x"
                    if "compile" in row[kind]:
                        cell += f", {row[kind]['compile'] / t:.2f}x"
                    cell += ")"
                cells.append(cell)
            print(f"| {row['C']} | " + " | ".join(cells) + " |")
    print("\nminimum times (ms): " + "; ".join(
        f"C={row['C']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["min_ms"].items()) for row in results["rows"]))
    for row in results["rows"]:
        if row["C"] == max(r["C"] for r in results["rows"]):
            parts = ", ".join(f"{k} {v:.1f} GB/s ({100 * v / results['copy_GBps']:.0f}% of copy)"
                              for k, v in row["fwd_bwd_GBps"].items())
            print(f"\nC={row['C']} fwd+bwd bandwidth (read logits + write gradient): {parts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
