"""Small-input checks of every GPU kernel op against the float64 reference, for one device run
(also under `compute-sanitizer --tool memcheck`: the sizes are tiny). Layouts that the CPU runs
never gave the GPU code: storage offsets that break 16-byte alignment (CUDA's vector loads,
Triton's divisibility specialisation), C = 1, C just over the CUDA warp/block switch (1024) and
the Triton column block (4096), transposed and strided rows; a side stream (results must match
the default stream's). Without a GPU it runs the Triton backend under the interpreter (set
TRITON_INTERPRET=1) on CPU tensors, to test this script.

    python device_smoke.py            # prints one line per failure, then a summary; rc 1 on failure
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

import commentaries_ext  # noqa: E402,F401
from commentaries_ext import backend  # noqa: E402
from commentaries_ext.reference import blend as RB  # noqa: E402
from commentaries_ext.reference import cross_entropy as RCE  # noqa: E402
from commentaries_ext.reference import solver as RS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("cuda", "triton") if b in backend.candidates("wce_forward", DEV)]
QUICK = os.environ.get("SMOKE_QUICK") == "1"  # under compute-sanitizer
fails, checks = [], 0


def close(name, got, want, dtype):
    global checks
    checks += 1
    tol = 1e-9 if dtype == torch.float64 else 2e-4 if dtype == torch.float32 else 3e-2
    got, want = got.double().cpu(), want.double().cpu()
    if got.numel() == 0 and want.numel() == 0:
        return
    scale = want.abs().nan_to_num(0, 0, 0).max().clamp(min=1.0)
    if got.shape != want.shape or not torch.allclose(got / scale, want / scale, rtol=tol, atol=tol, equal_nan=True):
        err = (got - want).abs().nan_to_num(float("inf")).max().item() if got.shape == want.shape else "shape"
        fails.append(f"{name}: max abs err {err}")


def layout(x, kind):
    if kind == "offset":  # 1-element storage offset: not 16-byte aligned
        big = torch.full((x.shape[0], x.shape[1] + 1), float("nan"), dtype=x.dtype, device=x.device)
        big[:, 1:] = x
        return big[:, 1:]
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        big = torch.full((x.shape[0] * 2, x.shape[1] * 3), float("nan"), dtype=x.dtype, device=x.device)
        big[::2, ::3] = x
        return big[::2, ::3]
    return x


def ce_case(bk, dtype, n, c, kind, gen):
    row = torch.float64 if dtype == torch.float64 else torch.float32
    z = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 3).to(DEV, dtype)
    y = torch.randint(0, c, (n,), generator=gen).to(DEV)
    y[::3] = -100
    yb = torch.randint(0, c, (n,), generator=gen).to(DEV)
    lam, g, s = (torch.rand(n, generator=gen, dtype=torch.float64).to(DEV, row) for _ in range(3))
    u, t = (torch.randn(n, c, generator=gen, dtype=torch.float64).to(DEV, dtype) for _ in range(2))
    zz, uu, tt = layout(z, kind), layout(u, kind), layout(t, kind)
    tag = f"{bk} {dtype} n={n} c={c} {kind}"
    z64, u64, t64 = z.double(), u.double(), t.double()
    for mix in ((None, None), (yb, lam)):
        m64 = (mix[0], None if mix[1] is None else mix[1].double())
        with backend.use(bk):
            loss, lse = backend.kernel("wce_forward", DEV)(zz, y, *mix, -100)
            grad = backend.kernel("wce_backward", DEV)(g, zz, lse, y, *mix, -100)
            jvp = backend.kernel("wce_jvp", DEV)(zz, lse, y, *mix, tt, -100)
        wl, wlse = RCE.wce_forward(z64, y, *m64, -100)
        close(f"wce_forward.loss {tag} mix={mix[0] is not None}", loss, wl, dtype)
        close(f"wce_forward.lse {tag}", lse, wlse, dtype)
        close(f"wce_backward {tag} mix={mix[0] is not None}", grad,
              RCE.wce_backward(g.double(), z64, wlse, y, *m64, -100), dtype)
        close(f"wce_jvp {tag} mix={mix[0] is not None}", jvp, RCE.wce_jvp(z64, wlse, y, *m64, t64, -100), dtype)
    with backend.use(bk):
        hvp = backend.kernel("wce_hvp", DEV)(zz, lse, s, uu)
    close(f"wce_hvp {tag}", hvp, RCE.wce_hvp(z64, wlse, s.double(), u64), dtype)
    return loss, grad, hvp


def blend_case(bk, dtype, gen):
    x = torch.randn(6, 3, 5, 7, generator=gen).to(DEV, dtype)
    perm = torch.randint(0, 6, (6,), generator=gen).to(DEV)
    for cl in (False, True):
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        g = torch.empty_like(xx).copy_(torch.randn(x.shape, generator=gen).to(dtype))
        xb = torch.empty_like(xx).copy_(torch.randn(x.shape, generator=gen).to(dtype))
        for m in (torch.rand(6, 1, 1, 1, generator=gen), torch.rand(6, 1, 5, 7, generator=gen),
                  torch.rand(6, 3, 1, 1, generator=gen), torch.rand(1, 3, 5, 7, generator=gen).expand(6, 3, 5, 7)):
            m = m.to(DEV, dtype)
            for b, p in ((None, perm), (xb, None), (xb, perm)):
                tag = f"blend {bk} {dtype} cl={cl} m={tuple(m.stride())} xb={b is not None} perm={p is not None}"
                with backend.use(bk):
                    out = backend.kernel("blend_forward", DEV)(xx, m, b, p)
                    grads = backend.kernel("blend_backward", DEV)(g, xx, m, b, p, [True, True, True])
                d = lambda v: None if v is None else v.double()  # noqa: E731
                close("forward " + tag, out, RB.blend_forward(d(xx), d(m), d(b), p), dtype)
                for name, a, w in zip(("g_xa", "g_xb", "g_m"), grads,
                                      RB.blend_backward(d(g), d(xx), d(m), d(b), p, [True, True, True])):
                    close(f"{name} {tag}", a, w, dtype)


def solver_case(bk, dtype, gen):
    sizes = [(1,), (4097,), (3, 5), (2049,)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.tensor(-0.7, dtype=acc, device=DEV)
    v = [[torch.randn(s, generator=gen).to(DEV, dtype) for s in sizes] for _ in range(4)]
    w = [[t.double().clone() for t in l] for l in v]  # clone: .double() of float64 is the tensor itself
    k = backend._kernels[bk]
    k["neumann_step"](v[0], v[1], v[2], a)
    RS.neumann_step(w[0], w[1], w[2], a.double())
    r1 = k["cg_update"](v[0], v[1], v[2], v[3], a)
    r2 = RS.cg_update(w[0], w[1], w[2], w[3], a.double())
    for i, (x, y) in enumerate(zip(v[0] + v[1], w[0] + w[1])):
        close(f"solver {bk} {dtype} tensor {i}", x, y, dtype)
    close(f"cg_update dot {bk} {dtype}", r1, r2, dtype if dtype != torch.float32 else torch.bfloat16)
    close(f"multi_dot {bk} {dtype}", k["multi_dot"](v[0], v[3]), RS.multi_dot(w[0], w[3]),
          dtype if dtype != torch.float32 else torch.bfloat16)


def main():
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float64] + ([torch.bfloat16, torch.float16] if DEV == "cuda" else [])
    def matrix(bk, dtype):
        # (n, c, layout) cases; Triton compiles one kernel per tile shape, dtype and alignment /
        # stride-1 specialisation (~0.2 s each on the device): fewer cases there
        if QUICK:  # a subset of the full run's cases (Triton's disk cache then has every kernel)
            return [(33, 10, "offset"), (2, 4099, "offset")] + ([(3, 1025, "offset")] if bk == "cuda" else [])
        shapes = [(1, 1), (5, 1), (33, 10), (9, 1024), (3, 1025), (2, 4099)]
        kinds = ("contiguous", "offset", "transposed", "strided")
        if bk == "triton":
            shapes = [(1, 1), (33, 10), (2, 4099)] if dtype == torch.float32 else [(33, 10), (2, 4099)]
            kinds = ("contiguous", "offset", "transposed") if dtype == torch.float32 else ("offset",)
        return [(n, c, k) for n, c in shapes for k in kinds]

    for bk in BACKENDS:
        for dtype in dtypes:
            for n, c, kind in matrix(bk, dtype):
                try:
                    ce_case(bk, dtype, n, c, kind, gen)
                except Exception as e:  # noqa: BLE001
                    fails.append(f"wce {bk} {dtype} n={n} c={c} {kind}: {type(e).__name__}: {str(e)[:300]}")
            for fn in (blend_case, solver_case):
                try:
                    fn(bk, dtype, gen)
                except Exception as e:  # noqa: BLE001
                    fails.append(f"{fn.__name__} {bk} {dtype}: {type(e).__name__}: {str(e)[:300]}")
        if DEV == "cuda":  # the current stream: a side stream must give the default stream's results
            st = torch.cuda.Stream()
            base = ce_case(bk, torch.float32, 64, 1000, "offset", torch.Generator().manual_seed(5))
            with torch.cuda.stream(st):
                side = ce_case(bk, torch.float32, 64, 1000, "offset", torch.Generator().manual_seed(5))
            torch.cuda.synchronize()
            for a, b in zip(base, side):
                close(f"side stream {bk}", a, b, torch.float64)
    if DEV == "cuda":
        torch.cuda.synchronize()
    for f in fails:
        print("FAIL", f)
    print(f"device_smoke: {checks} checks, {len(fails)} failures, backends {BACKENDS} on {DEV}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
