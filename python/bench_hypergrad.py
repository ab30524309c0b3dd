"""Hypergradient engine benchmark: IFT hyper-steps and BPTT outer steps against
the reference code's style, torchopt and higher, as multiples of one plain
training step (forward, backward, torch.optim.Adam) of the same student.

    python python/bench_hypergrad.py                  # everything, both students
    python python/bench_hypergrad.py --quick          # smoke run
    python python/bench_hypergrad.py --malloc mmap    # re-exec with MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0
    python python/bench_hypergrad.py --malloc keep    # re-exec with glibc keeping freed memory (no page faults)

Problem (IFT): blending commentary phi in R^{CxC} (init -1); partner j from a
permutation of the batch; lam = 1 - 0.5 sigmoid(phi[y_i, y_j]);
x~ = lam x_i + (1 - lam) x_j; loss mean(lam CE(y_i) + (1 - lam) CE(y_j)); K
Neumann terms with alpha = lr = 1e-3; v = dL_V/dtheta on a clean validation
batch; g_T on a fresh training batch; hypergradient -d(g_T . p)/dphi.  The
student is in training mode (BatchNorm uses batch statistics).

Timing: the methods run round-robin, one call each per round, and the median
per method is reported (noise on a shared machine hits all methods alike).
Peak memory: measured in a fresh child process per method with
MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 (freed blocks go back to
the OS, so RSS follows live memory): peak RSS (VmHWM, reset through
/proc/self/clear_refs) during one call after a warm-up call, minus the RSS
before it.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def _maybe_reexec(mode: str) -> None:
    want = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
            # glibc keeps freed memory (the largest mmap threshold it accepts, 32 MB): no page
            # faults on reuse for any method, the plain training step included
            "keep": {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}}.get(mode)
    if want and any(os.environ.get(k) != v for k, v in want.items()):
        env = dict(os.environ, **want)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from commentaries_ext.engine import (  # noqa: E402
    Adam as DAdam,
    FunctionalModule,
    NeumannConfig,
    implicit_hypergradient,
    unroll,
)
from commentaries_ext.memory import reuse_cpu_memory  # noqa: E402

C = 10


# --------------------------------------------------------------------------- students


def convnet():
    # the reference ConvNet; paddings (2, 1) so that 28x28 inputs reach a 1x1 map
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, 2, 2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(64, C),
    )


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, C))


STUDENTS = {"convnet": convnet, "mlp": mlp}


def make_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    return x, y, perm


def blend_loss_from_logits_fn(forward, phi, x, y, perm):
    lam = 1 - 0.5 * torch.sigmoid(phi[y, y[perm]])
    lx = lam.view(-1, *([1] * (x.dim() - 1)))
    xt = lx * x + (1 - lx) * x[perm]
    z = forward(xt)
    return (lam * F.cross_entropy(z, y, reduction="none") + (1 - lam) * F.cross_entropy(z, y[perm], reduction="none")).mean()


# --------------------------------------------------------------------------- measurement


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def peak_mb(fn):
    """Peak RSS increase (MB) while running fn()."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def round_robin(fns: dict, rounds: int, warmup: int = 1):
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- IFT methods


def gather_flat_grad(loss_grad):
    return torch.cat([p.reshape(-1) for p in loss_grad])


def reference_hyper_step(model, phi, train_batch, val_batch, K, lr):
    """The reference code's hyper-step (Lorraine et al.'s Neumann code as used by
    googleinterns/commentaries): flat gradients, double backward per term
    through the retained graph of g_T, final grad to phi."""
    xv, yv, _ = val_batch
    val_loss = F.cross_entropy(model(xv), yv)
    d_val_loss_d_theta = torch.autograd.grad(val_loss, model.parameters())
    x, y, perm = train_batch
    train_loss = blend_loss_from_logits_fn(model, phi, x, y, perm)
    d_train_loss_d_w = torch.autograd.grad(train_loss, model.parameters(), create_graph=True)
    d_train_loss_d_w = gather_flat_grad(d_train_loss_d_w)
    # neumann_hyperstep_preconditioner
    preconditioner = gather_flat_grad(d_val_loss_d_theta).detach()
    counter = preconditioner
    for _ in range(K):
        old_counter = counter
        hessian_term = gather_flat_grad(
            torch.autograd.grad(d_train_loss_d_w, model.parameters(), grad_outputs=counter.view(-1), retain_graph=True)
        )
        counter = old_counter - lr * hessian_term
        preconditioner = preconditioner + counter
    preconditioner = lr * preconditioner
    indirect_grad = torch.autograd.grad(d_train_loss_d_w, phi, grad_outputs=preconditioner.view(-1))[0]
    return -indirect_grad


def engine_hyper_step(fm, params, phi, train_batch, val_batch, K, lr, hvp):
    def train_loss(p, h, b):
        x, y, perm = b
        return blend_loss_from_logits_fn(lambda t: fm(p, t), h["phi"], x, y, perm)

    def val_loss(p, h, b):
        return F.cross_entropy(fm(p, b[0]), b[1])

    res = implicit_hypergradient(train_loss, val_loss, params, {"phi": phi}, train_batch, val_batch,
                                 solver=NeumannConfig(K=K, alpha=lr), hvp=hvp)
    return res.grads["phi"]


def torchopt_hyper_step_factory(fm, solver_name, K, lr):
    import torchopt

    names = list(fm.param_names)

    def inner_loss(params, meta_params, data):
        x, y, perm = data
        p = dict(zip(names, params))
        return blend_loss_from_logits_fn(lambda t: fm(p, t), meta_params[0], x, y, perm)

    # torchopt evaluates the optimality condition under torch.func transforms:
    # the stationarity condition is torch.func.grad of the inner loss (as in its examples)
    stationary = torch.func.grad(inner_loss, argnums=0)

    if solver_name == "neumann":
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=K, alpha=lr)
    else:
        solve = torchopt.linear_solve.solve_cg(maxiter=K)

    @torchopt.diff.implicit.custom_root(stationary, argnums=1, solve=solve)
    def inner(params, meta_params, data):
        return params

    def step(params, phi, train_batch, val_batch):
        phi = phi.detach().requires_grad_(True)
        ps = tuple(params[n].detach().requires_grad_(True) for n in names)
        out = inner(ps, (phi,), train_batch)
        p = dict(zip(names, out))
        val = F.cross_entropy(fm(p, val_batch[0]), val_batch[1])
        return torch.autograd.grad(val, phi)[0]

    return step


def ift_setup(student, batch=128, lr=1e-3):
    torch.manual_seed(0)
    model = STUDENTS[student]().train()
    fm = FunctionalModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tb, vb, b0 = make_batch(batch, 1), make_batch(batch, 2), make_batch(batch, 3)
    for _ in range(3):  # a few plain steps so that the student is not at its initialisation
        opt.zero_grad()
        F.cross_entropy(model(b0[0]), b0[1]).backward()
        opt.step()
    phi = torch.full((C, C), -1.0, requires_grad=True)
    return dict(model=model, fm=fm, opt=opt, tb=tb, vb=vb, b0=b0, phi=phi, params=fm.params(), lr=lr)


def ift_methods(ctx, K, with_torchopt=True):
    model, fm, opt, tb, vb, b0, phi, params, lr = (ctx[k] for k in ("model", "fm", "opt", "tb", "vb", "b0", "phi", "params", "lr"))

    def train_step():
        opt.zero_grad()
        F.cross_entropy(model(b0[0]), b0[1]).backward()
        opt.step()

    fns = {
        "train step": train_step,
        "reference-style": lambda: reference_hyper_step(model, phi, tb, vb, K, lr),
        "engine double_backward": lambda: engine_hyper_step(fm, params, phi, tb, vb, K, lr, "double_backward"),
        "engine auto": lambda: engine_hyper_step(fm, params, phi, tb, vb, K, lr, "auto"),
    }
    if with_torchopt:
        for sname in ("neumann", "cg"):
            st = torchopt_hyper_step_factory(fm, sname, K, lr)
            fns[f"torchopt {sname}"] = lambda st=st: st(params, phi, tb, vb)
    return fns


def bench_ift(student, Ks, rounds, log=print, memory=True):
    ctx = ift_setup(student)
    fm, params, phi, tb, vb, lr, model = (ctx[k] for k in ("fm", "params", "phi", "tb", "vb", "lr", "model"))
    # correctness: all methods give the same hypergradient (float32 rounding aside)
    ref = reference_hyper_step(model, phi, tb, vb, 5, lr)
    checks = {}
    for hvp in ("double_backward", "forward_over_reverse", "auto"):
        g = engine_hyper_step(fm, params, phi, tb, vb, 5, lr, hvp)
        checks[hvp] = float((g - ref).norm() / ref.norm())
    try:
        g = torchopt_hyper_step_factory(fm, "neumann", 5, lr)(params, phi, tb, vb)
        checks["torchopt-neumann"] = float((g - ref).norm() / ref.norm())
        torchopt_ok = True
    except Exception as exc:  # noqa: BLE001
        log(f"  torchopt skipped: {type(exc).__name__}: {exc}")
        torchopt_ok = False
    log(f"  [{student}] K=5 rel. difference to the reference-style hypergradient: " + ", ".join(f"{k}={v:.1e}" for k, v in checks.items()))
    rows = []
    for K in Ks:
        fns = ift_methods(ctx, K, torchopt_ok)
        med = round_robin(fns, rounds)
        mem = {k: child_peak_mb("ift", student, K, k) if memory else float("nan") for k in fns}
        base = med["train step"]
        for k in fns:
            rows.append((student, K, k, med[k] * 1e3, med[k] / base, mem[k]))
            log(f"  {student:8s} K={K:<3d} {k:28s} {med[k] * 1e3:9.1f} ms  {med[k] / base:6.2f}x  peak {mem[k]:7.1f} MB")
    return rows


def child_peak_mb(section, student, param, method):
    """Peak memory of one call of ``method``, measured in a fresh process whose glibc
    returns large blocks to the OS at once (MALLOC_MMAP_THRESHOLD_=65536), after one warm-up call."""
    import json
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--mem-child", json.dumps([section, student, param, method]),
           "--threads", str(torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001
        return float("nan")


def mem_child(spec):
    import json

    section, student, param, method = json.loads(spec)
    if section == "ift":
        fns = ift_methods(ift_setup(student), param, method.startswith("torchopt"))
    else:
        fns = bptt_methods(bptt_setup(student), param)
    f = fns[method]
    f()
    print(peak_mb(f))


# --------------------------------------------------------------------------- BPTT


def bptt_setup(student, batch=32, lr=1e-3, T_max=50):
    torch.manual_seed(0)
    model = STUDENTS[student]().train()
    fm = FunctionalModule(model)
    batches = [make_batch(batch, 100 + t) for t in range(T_max)]
    vb = make_batch(batch, 99)
    phi = torch.full((C, C), -1.0, requires_grad=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return dict(model=model, fm=fm, batches=batches, vb=vb, phi=phi, opt=opt, lr=lr)


def _bptt_fns(ctx):
    import higher

    model, fm, batches, vb, phi, opt, lr = (ctx[k] for k in ("model", "fm", "batches", "vb", "phi", "opt", "lr"))

    def plain_step():
        x, y, _ = batches[0]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def higher_outer(T, sgd=False):
        inner_opt = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else torch.optim.Adam(model.parameters(), lr=lr)
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=True) as (fmodel, diffopt):
            for t in range(T):
                x, y, perm = batches[t]
                diffopt.step(blend_loss_from_logits_fn(fmodel, phi, x, y, perm))
            val = F.cross_entropy(fmodel(vb[0]), vb[1])
            return torch.autograd.grad(val, phi)[0]

    def loss_fn(p, buf, h, b):
        x, y, perm = b
        box = {}

        def fwd(t):
            out, box["nb"] = fm.call_update(p, buf, t)
            return out

        loss = blend_loss_from_logits_fn(fwd, h["phi"], x, y, perm)
        return loss, box["nb"]

    def engine_outer(T, checkpoint=None, sgd=False):
        from commentaries_ext.engine import SGD as DSGD

        with reuse_cpu_memory():  # the outer backward reuses the inner steps' freed blocks
            res = unroll(loss_fn, fm.params(), DSGD(lr=0.1) if sgd else DAdam(lr=lr), batches[:T], hparams={"phi": phi},
                         buffers=fm.buffers(), checkpoint=checkpoint)
            val = F.cross_entropy(fm(res.params, vb[0]), vb[1])
            return torch.autograd.grad(val, phi)[0]

    return plain_step, higher_outer, engine_outer


def bptt_methods(ctx, T):
    plain_step, higher_outer, engine_outer = _bptt_fns(ctx)
    s = max(1, int(math.ceil(math.sqrt(T))))
    return {
        "plain step": plain_step,
        "higher": lambda: higher_outer(T),
        "engine": lambda: engine_outer(T),
        "engine checkpoint": lambda: engine_outer(T, checkpoint=s),
    }


def bench_bptt(student, Ts, rounds, log=print, memory=True):
    ctx = bptt_setup(student, T_max=max(Ts))
    plain_step, higher_outer, engine_outer = _bptt_fns(ctx)
    T_check = min(5, max(Ts))  # the correctness check unrolls at most the batches there are
    # correctness: with SGD the engine and higher agree to rounding.  (higher's Adam is the
    # pre-1.x formula -- eps added to sqrt(v) before bias correction -- so its Adam
    # meta-gradients differ from torch.optim.Adam's; the engine follows torch.optim.)
    g_e, g_h = engine_outer(T_check, sgd=True), higher_outer(T_check, sgd=True)
    g_a, g_c = engine_outer(T_check), engine_outer(T_check, checkpoint=2)
    log(f"  [{student}] BPTT rel. difference engine vs higher (SGD): {float((g_e - g_h).norm() / g_h.norm()):.1e}, "
        f"checkpointed vs not (Adam): {float((g_c - g_a).norm() / g_a.norm()):.1e}")
    rows, mems = [], {}
    for T in Ts:
        fns = bptt_methods(ctx, T)
        med = round_robin(fns, rounds)
        mem = {k: child_peak_mb("bptt", student, T, k) if memory else float("nan") for k in fns}
        base = med["plain step"] * T
        for k in fns:
            mems[(k, T)] = mem[k]
            if k == "plain step":
                continue
            rows.append((student, T, k, med[k] * 1e3, med[k] / base, mem[k]))
            log(f"  {student:8s} T={T:<3d} {k:20s} {med[k] * 1e3:9.1f} ms  {med[k] / base:6.2f}x T plain  peak {mem[k]:7.1f} MB")
    if len(Ts) >= 2:
        t0, t1 = min(Ts), max(Ts)
        for k in ("higher", "engine", "engine checkpoint"):
            slope = (mems[(k, t1)] - mems[(k, t0)]) / (t1 - t0)
            log(f"  {student:8s} {k:20s} memory per unrolled step: {slope:6.2f} MB")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="convnet,mlp")
    ap.add_argument("--K", default="1,5,20")
    ap.add_argument("--T", default="10,50")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bptt-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--malloc", choices=["default", "mmap", "keep"], default="default",
                    help="allocator for the timings (peak memory is always measured in child processes with mmap)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help="comma list of: ift,bptt")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        mem_child(args.mem_child)
        return
    _maybe_reexec(args.malloc)
    if args.quick:
        args.K, args.T, args.rounds, args.bptt_rounds = "1,5", "4,8", 2, 1
    Ks = [int(k) for k in args.K.split(",")]
    Ts = [int(t) for t in args.T.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")
    for student in args.students.split(","):
        if "ift" not in skip:
            bench_ift(student, Ks, args.rounds, memory=not args.no_memory)
        if "bptt" not in skip:
            try:
                bench_bptt(student, Ts, args.bptt_rounds, memory=not args.no_memory)
            except ImportError as exc:
                print(f"  BPTT vs higher skipped: {exc}")


if __name__ == "__main__":
    main()
