"""Compile every Triton kernel for an NVIDIA GPU target ahead of time (no GPU needed).

    TRITON_INTERPRET= python -m commentaries_ext.triton_kernels._aot_check [ARCH=90]

Catches what Triton's CPU interpreter cannot: code that does not lower to
PTX/cubin (dtypes, casts, layouts).  Every kernel in every dtype variant and
constexpr branch the launchers use, with the warps they launch with.  Run with
TRITON_INTERPRET unset (the tests do this in a subprocess).
"""
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1 (the kernels must be real JIT functions)")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from commentaries_ext.triton_kernels import blend as B  # noqa: E402
from commentaries_ext.triton_kernels import cross_entropy as CE  # noqa: E402
from commentaries_ext.triton_kernels import solver as S  # noqa: E402
from commentaries_ext.triton_kernels._common import num_warps_for  # noqa: E402

TL = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}

def acc(e):
    return "fp64" if e == "fp64" else "fp32"

def specs():
    """(kernel, signature, constexprs, num_warps, element dtype) of every variant, each tile with
    the warps its launcher picks (num_warps_for)."""
    for e in ("fp32", "fp64", "bf16", "fp16"):
        a = acc(e)
        for mix in (True, False):
            ce = dict(HAS_MIX=mix, ACC=TL[a])
            yield CE._wce_forward_kernel, dict(Z="*"+e, Y="*i64", YB="*i64", LAM="*"+a, LOSS="*"+a, LSE="*"+a, N="i32", C="i32", szn="i64", szc="i32", sy="i64", syb="i64", slam="i64", ignore_index="i64"), dict(ce, BLOCK_N=4, BLOCK_C=1024), e
            yield CE._wce_backward_kernel, dict(G="*"+a, Z="*"+e, LSE="*"+a, Y="*i64", YB="*i64", LAM="*"+a, OUT="*"+e, N="i32", C="i32", sg="i64", szn="i64", szc="i64", slse="i64", sy="i64", syb="i64", slam="i64", ignore_index="i64"), dict(ce, BLOCK_N=256, BLOCK_C=16), e
            yield CE._wce_jvp_kernel, dict(Z="*"+e, LSE="*"+a, Y="*i64", YB="*i64", LAM="*"+a, T="*"+e, OUT="*"+a, N="i32", C="i32", szn="i64", szc="i64", slse="i64", sy="i64", syb="i64", slam="i64", stn="i64", stc="i64", ignore_index="i64"), dict(ce, BLOCK_N=1, BLOCK_C=4096), e
        for single in (True, False):
            yield CE._wce_hvp_kernel, dict(Z="*"+e, LSE="*"+a, SCALE="*"+a, U="*"+e, OUT="*"+e, N="i32", C="i32", szn="i64", szc="i64", slse="i64", ssc="i64", sun="i64", suc="i64"), dict(ACC=TL[a], SINGLE=single, BLOCK_N=8, BLOCK_C=512), e
        m = dict(F="i32", sxa="i64", sxb="i64", msn="i64", MS1="i64", MS2="i64", MS3="i64", S2="i32", S3="i32")
        for has_perm in (True, False):
            yield B._blend_fwd_kernel, dict(XA="*"+e, XB="*"+e, M="*"+e, PERM="*i64", OUT="*"+e, **m), dict(HAS_PERM=has_perm, ACC=TL[a], BLOCK=B.BLOCK), e
            # the launcher's combinations: grad_x_a / grad_x_b written here unless scattered, grad_m's products
            for gxa, gxb, prod in ((a_, b_, p_) for a_ in (True, False) for b_ in (True, False) for p_ in (True, False) if a_ or b_ or p_):
                for rowsum in ((True, False) if prod else (False,)):
                    yield B._blend_bwd_kernel, dict(G="*"+e, XA="*"+e, XB="*"+e, M="*"+e, PERM="*i64", GXA="*"+e, GXB="*"+e, PROD="*"+a, F="i32", sxa="i64", sxb="i64", sgxb="i64", **{k: v for k, v in m.items() if k not in ("F", "sxa", "sxb")}), dict(HAS_PERM=has_perm, WANT_GXA=gxa, WANT_GXB=gxb, WANT_PROD=prod, ROWSUM=rowsum, ACC=TL[a], BLOCK=B.BLOCK), e
        for self_ in (True, False):
            yield B._blend_gather_kernel, dict(G="*"+e, M="*"+e, OUT="*"+e, ORDER="*i64", OFFS="*i64", F="i32", sg="i64", sout="i64", msn="i64", MS1="i64", MS2="i64", MS3="i64", S2="i32", S3="i32"), dict(SELF=self_, ACC=TL[a], BLOCK=B.BLOCK), e
        t = dict(PTRS="*i64", TIDX="*i32", STARTS="*i64", NUMELS="*i64", T="i32")
        yield S._neumann_kernel, dict(**t, ALPHA="*"+a), dict(DT=TL[e], ACC=TL[a], BLOCK=S.BLOCK), e
        for opt in (True, False):
            yield S._axpy_dot_kernel, dict(**t, A="*"+a, PART="*"+a), dict(HAS_Z=opt, DT=TL[e], ACC=TL[a], BLOCK=S.BLOCK), e
            yield S._dot_kernel, dict(**t, PART="*"+a), dict(HAS_Y=opt, DT=TL[e], ACC=TL[a], BLOCK=S.BLOCK), e
        yield S._cg_kernel, dict(**t, A="*"+a, PART="*"+a), dict(DT=TL[e], ACC=TL[a], BLOCK=S.BLOCK), e


def warps(const):
    """The warps the launchers use: num_warps_for(tile), 4 for the solver kernels."""
    if "BLOCK_N" in const:
        return num_warps_for(const["BLOCK_N"] * const["BLOCK_C"])
    if "DT" in const:
        return 4
    return num_warps_for(const["BLOCK"])

def main():
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    target = GPUTarget("cuda", arch, 32)
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    n = 0; t0 = time.time(); failures = []
    for fn, sig, const, elem in specs():
        if dtypes and elem not in dtypes:
            continue
        full = dict(sig); full.update({k: "constexpr" for k in const})
        try:
            triton.compile(ASTSource(fn, full, constexprs=const), target=target, options={"num_warps": warps(const)})
            n += 1
        except Exception as exc:
            failures.append(f"{fn.__name__} {sig.get('Z') or sig.get('XA') or const.get('DT')} {const}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"compiled {n} kernels in {time.time() - t0:.1f}s")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0

if __name__ == "__main__":
    raise SystemExit(main())
