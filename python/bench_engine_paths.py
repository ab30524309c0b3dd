"""The engine's CPU fast paths one by one, each against the PyTorch way, measured
side by side (round-robin, medians) in one run:

* max pooling: ATen's NCHW kernel vs ``engine/pooling.py`` (forward + backward);
* BatchNorm's double backward: the stock formula vs the reverse-mode rule of
  ``engine/batchnorm.py``, inside ``batch_norm_rules`` (Python formulas on the channel
  kernels) and inside ``batch_norm_reverse_rules`` (one C++ kernel, ``batch_norm_reverse``);
* col2im for the first convolution's input gradient: ATen's vs ``ops/fold.py``'s;
* two input gradients of one convolution added together vs the merged call of
  ``linearize._merge_input_grads``;
* one ConvNet IFT hyper-step (K = 5) with and without ``reuse_cpu_memory()``.

    python python/bench_engine_paths.py [--rounds 40] [--threads 2]

Shapes are the reference ConvNet's at batch 128 (DESIGN.md; bench_hypergrad.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_hypergrad
from commentaries_ext.engine.batchnorm import batch_norm_reverse_rules, batch_norm_rules  # noqa: E402
from commentaries_ext.engine.conv import CONV_BWD  # noqa: E402
from commentaries_ext.engine.pooling import pool_rules  # noqa: E402
from commentaries_ext.memory import reuse_cpu_memory  # noqa: E402
from commentaries_ext.ops.fold import col2im  # noqa: E402


def round_robin(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title, med, base):
    print(title)
    for k, t in med.items():
        print(f"  {k:34s} {t * 1e6:9.0f} us   {med[base] / t:5.2f}x vs {base}")


def bench_pool(rounds):
    x = torch.randn(128, 32, 14, 14, requires_grad=True)

    def run(mode):
        def f():
            with mode():
                y = F.max_pool2d(x, 3, 2)
            torch.autograd.grad(y.sum(), x)
        return f

    with reuse_cpu_memory():
        med = round_robin({"ATen NCHW": run(contextlib.nullcontext), "engine (channels-last)": run(pool_rules)}, rounds)
    report("max_pool2d 3x3/2 on 128x32x14x14, forward + backward", med, "ATen NCHW")


def bench_bn_double_backward(rounds, batch=128):
    x = torch.randn(batch, 32, 14, 14, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    r = torch.randn(x.shape)

    def run(mode):
        def f():
            with mode():
                gs = torch.autograd.grad((F.batch_norm(x, None, None, w, b, training=True) * r).sum(), (x, w),
                                         create_graph=True)
            torch.autograd.grad(gs[0].square().sum() + gs[1].sum(), (x, w, b), allow_unused=True)
        return f

    with reuse_cpu_memory():
        med = round_robin({"stock": run(contextlib.nullcontext), "engine rule": run(batch_norm_rules),
                           "engine reverse kernel": run(batch_norm_reverse_rules)}, rounds)
    report(f"BatchNorm2d(32) on {batch}x32x14x14: gradient with graph + double backward", med, "stock")


def bench_col2im(rounds, batch):
    cols = torch.randn(batch, 25, 196)  # the first layer: 1 channel, 5x5, stride 2, padding 2, 28x28
    med = round_robin({"ATen col2im": lambda: torch.ops.aten.col2im(cols, [28, 28], [5, 5], [1, 1], [2, 2], [2, 2]),
                       "ops.fold.col2im (cpp)": lambda: col2im(cols, (28, 28), (5, 5), 1, 2, 2)}, rounds)
    report(f"col2im [{batch}, 25, 196] -> [{batch}, 1, 28, 28] (first convolution's input gradient)", med,
           "ATen col2im")


def bench_merge(rounds):
    x = torch.randn(128, 32, 6, 6)
    W, dW = torch.randn(64, 32, 3, 3), torch.randn(64, 32, 3, 3)
    gy, dgy = torch.randn(128, 64, 3, 3), torch.randn(128, 64, 3, 3)
    args = ([2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])

    def separate():
        return CONV_BWD(dgy, x, W, None, *args)[0] + CONV_BWD(gy, x, dW, None, *args)[0]

    def merged():
        return CONV_BWD(torch.cat([dgy, gy], 1), x, torch.cat([W, dW], 0), None, *args)[0]

    with reuse_cpu_memory():
        med = round_robin({"two calls + add": separate, "merged": merged}, rounds)
    report("conv 32->64 3x3/2 input gradients conv_T(dgy, W) + conv_T(gy, dW), batch 128", med, "two calls + add")


def bench_hyper_step(rounds, K=5):
    import bench_hypergrad as B

    ctx = B.ift_setup("convnet")
    step = B.ift_methods(ctx, K, with_torchopt=False)["engine auto"]

    def without():
        os.environ["COMMENTARIES_EXT_REUSE_CPU_MEMORY"] = "0"  # read by every scope (memory.py)
        try:
            step()
        finally:
            del os.environ["COMMENTARIES_EXT_REUSE_CPU_MEMORY"]

    med = round_robin({"glibc (default)": without, "reuse_cpu_memory": step}, rounds)
    report(f"one ConvNet IFT hyper-step, K = {K}, engine auto (batch 128)", med, "glibc (default)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_pool(args.rounds)
    bench_bn_double_backward(args.rounds)
    bench_bn_double_backward(args.rounds, batch=32)  # the BPTT benchmark's batch
    bench_col2im(args.rounds, 32)
    bench_col2im(args.rounds, 128)
    bench_merge(args.rounds)
    bench_hyper_step(max(5, args.rounds // 4))


if __name__ == "__main__":
    main()
