"""GPU micro-benchmark of the kernel ops: every GPU backend (``triton``,
``cuda``) against eager PyTorch and ``torch.compile`` of the same math, timed
with CUDA events, with the achieved bandwidth compared with a measured
device-to-device copy bandwidth.

    python python/bench_gpu_kernels.py                       # everything
    python python/bench_gpu_kernels.py --only cross_entropy  # or: blend, solver
    python python/bench_gpu_kernels.py --dtype bfloat16 --no-compile

Needs a CUDA GPU (exits with a message otherwise).  Medians over rounds that
interleave the methods; ratios are within one run.  "GB/s" counts the minimum
traffic of each op (every input read once, every output written once).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

# the repository root (as the sibling scripts do): on a machine where the package is only built
# in place (scripts/gpu_check on a fresh GPU machine) it is not installed
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import commentaries_ext  # noqa: F401  (registers every backend)
from commentaries_ext import backend

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def cuda_time(fns: dict, rounds: int = 15, inner: int = 20, warmup: int = 3) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end) / 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_bandwidth(nbytes: int = 1 << 28) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = cuda_time({"copy": lambda: dst.copy_(src)})["copy"]
    return 2 * nbytes / t / 1e9  # read + write


def kernel_peers(op: str) -> dict:
    out = {}
    for bk in ("triton", "cuda"):
        fn = backend._kernels[bk].get(op)
        if fn is not None:
            out[bk] = fn
    return out


def report(title: str, times: dict, nbytes: int, copy_bw: float) -> None:
    print(f"\n== {title}  (minimum traffic {nbytes / 1e6:.1f} MB)")
    base = times.get("eager")
    for k, t in sorted(times.items(), key=lambda kv: kv[1]):
        bw = nbytes / t / 1e9
        ratio = f"{base / t:5.2f}x vs eager" if base else ""
        print(f"  {k:>10}: {t * 1e6:9.1f} us  {bw:7.1f} GB/s ({100 * bw / copy_bw:5.1f}% of copy)  {ratio}")


# ----------------------------------------------------------------- cross-entropy


def bench_cross_entropy(dtype, compile_peers: bool, copy_bw: float) -> None:
    for n, c in ((8192, 10), (4096, 1000), (512, 32000)):
        z = torch.randn(n, c, device="cuda", dtype=dtype)
        y = torch.randint(0, c, (n,), device="cuda")
        yb = torch.randint(0, c, (n,), device="cuda")
        row = torch.float64 if dtype == torch.float64 else torch.float32
        lam = torch.rand(n, device="cuda", dtype=row)
        g = torch.randn(n, device="cuda", dtype=row)
        u = torch.randn_like(z)
        esz = z.element_size()

        def eager_fwd(z=z):
            zf = z.float() if dtype != torch.float64 else z
            lse = torch.logsumexp(zf, 1)
            zy, zb = zf.gather(1, y[:, None])[:, 0], zf.gather(1, yb[:, None])[:, 0]
            return lse - lam * zy - (1 - lam) * zb, lse

        def eager_bwd(z=z):
            p = torch.softmax(z.float() if dtype != torch.float64 else z, 1)
            p.scatter_add_(1, y[:, None], -lam[:, None])
            p.scatter_add_(1, yb[:, None], -(1 - lam)[:, None])
            return (g[:, None] * p).to(dtype)

        def eager_hvp(z=z):
            p = torch.softmax(z.float() if dtype != torch.float64 else z, 1)
            pu = p * u
            return (g[:, None] * (pu - p * pu.sum(1, keepdim=True))).to(dtype)

        lse = eager_fwd()[1]
        cases = {
            "wce_forward": (eager_fwd, lambda fn: fn(z, y, yb, lam, -100), n * c * esz),
            "wce_backward": (eager_bwd, lambda fn: fn(g, z, lse, y, yb, lam, -100), 2 * n * c * esz),
            "wce_hvp": (eager_hvp, lambda fn: fn(z, lse, g, u), 3 * n * c * esz),
        }
        for op, (eager, call, nbytes) in cases.items():
            fns = {"eager": eager}
            if compile_peers:
                fns["compile"] = torch.compile(eager)
            for bk, fn in kernel_peers(op).items():
                fns[bk] = (lambda fn=fn, call=call: call(fn))
            report(f"{op} N={n} C={c} {dtype}", cuda_time(fns), nbytes, copy_bw)


# ----------------------------------------------------------------- blend


def bench_blend(dtype, compile_peers: bool, copy_bw: float) -> None:
    x = torch.randn(256, 3, 32, 32, device="cuda", dtype=dtype)
    perm = torch.randperm(256, device="cuda")
    g = torch.randn_like(x)
    for name, m in (("per-example", torch.rand(256, 1, 1, 1, device="cuda", dtype=dtype)),
                    ("per-pixel", torch.rand(256, 1, 32, 32, device="cuda", dtype=dtype))):
        nbytes = 2 * x.numel() * x.element_size()

        def eager_fwd(m=m):
            xb = x[perm]
            return xb + m * (x - xb)

        fns = {"eager": eager_fwd}
        if compile_peers:
            fns["compile"] = torch.compile(eager_fwd)
        for bk, fn in kernel_peers("blend_forward").items():
            fns[bk] = (lambda fn=fn, m=m: fn(x, m, None, perm))
        report(f"blend_forward {name} {dtype}", cuda_time(fns), nbytes, copy_bw)

        def eager_bwd(m=m):
            gxa = (g * m).index_add(0, perm, g * (1 - m))
            gm = (g * (x - x[perm])).sum(dim=[d for d in range(1, 4) if m.shape[d] == 1], keepdim=True)
            return gxa, gm

        fns = {"eager": eager_bwd}
        if compile_peers:
            fns["compile"] = torch.compile(eager_bwd)
        for bk, fn in kernel_peers("blend_backward").items():
            fns[bk] = (lambda fn=fn, m=m: fn(g, x, m, None, perm, [True, False, True]))
        report(f"blend_backward {name} {dtype}", cuda_time(fns), 3 * x.numel() * x.element_size(), copy_bw)


# ----------------------------------------------------------------- solver


def bench_solver(dtype, compile_peers: bool, copy_bw: float) -> None:
    sizes = [500_000] * 20
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c, p, h = ([torch.randn(s, device="cuda", dtype=dtype) for s in sizes] for _ in range(3))
    alpha = torch.tensor(1e-3, device="cuda", dtype=acc)
    esz = c[0].element_size()
    total = sum(sizes)

    def foreach():
        torch._foreach_add_(c, h, alpha=-1e-3)
        torch._foreach_add_(p, c)

    fns = {"eager": foreach}
    for bk, fn in kernel_peers("neumann_step").items():
        fns[bk] = (lambda fn=fn: fn(c, p, h, alpha))
    report(f"neumann_step 20 x 500k {dtype}", cuda_time(fns), 5 * total * esz, copy_bw)

    def eager_dot():
        return torch.stack([torch.dot(a.float(), b.float()) for a, b in zip(c, h)]).sum()

    fns = {"eager": eager_dot}
    if compile_peers:
        fns["compile"] = torch.compile(eager_dot)
    for bk, fn in kernel_peers("multi_dot").items():
        fns[bk] = (lambda fn=fn: fn(c, h))
    report(f"multi_dot 20 x 500k {dtype}", cuda_time(fns), 2 * total * esz, copy_bw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("cross_entropy", "blend", "solver"))
    ap.add_argument("--dtype", choices=sorted(DT), default="float32")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_kernels.py needs a CUDA GPU; none is available here.", file=sys.stderr)
        return 2
    dtype = DT[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"GPU backends: {[b for b in ('triton', 'cuda') if backend._kernels[b]]}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw:.0f} GB/s (read + write)")
    if args.only in (None, "cross_entropy"):
        bench_cross_entropy(dtype, not args.no_compile, copy_bw)
    if args.only in (None, "blend"):
        bench_blend(dtype, not args.no_compile, copy_bw)
    if args.only in (None, "solver"):
        bench_solver(dtype, not args.no_compile, copy_bw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
