"""Explicit 16-lane float32 vectors for numba kernels (a zmm register on AVX-512, two ymm on AVX2).

Why: LLVM's auto-vectorizer keeps accumulators in memory, picks 256-bit vectors and
scalar remainder loops on this net's short trip counts (25, 30, 200); measured, that
left the 1989 step at ~35 us. With an explicit vector type the kernels decide what
lives in registers, and every multiply-add is an explicit fused `vfma`, so the solo
kernel (lanes = image positions) and the population kernel (lanes = replicas) can run
the same sequence of roundings for each replica and agree bit for bit.

`V16` is a numba type whose LLVM representation is <16 x float>. Loads and stores take
a C-contiguous float32 array of any rank and a flat element offset (no bounds checks:
callers own the layouts). Cross-lane operations (`vperm2`, `vhsum`) are the only ones
that see lanes; everything else is lane-wise, so a lane computes exactly what scalar
code with the same operation order computes. The kernels are compiled without fastmath
(no reassociation or contraction beyond the explicit fmas), or LLVM would reorder sums
differently in the two kernels.

Two instruction sets (ISA, from the host CPU; cpu_reason() says why neither is there):
  avx512  (x86-64-v4) a V16 is one zmm register; vperm2 is vpermt2ps, the reciprocal and
          reciprocal square root estimates (vrcp14, vrsqrt14: 14 bits, then one Newton step
          in the callers) vrcp14ps and vrsqrt14ps;
  avx2    (x86-64-v3: AVX2 and FMA, e.g. AMD Zen) LLVM splits every V16 into two ymm halves;
          vperm2 is built from four vpermps and three blends a half, and the estimates are
          the exact 1/x and 1/sqrt(x) (the Newton step after them then changes at most the
          last bit), since vrcpps' 12 bits would leave the step's result ~2^-23 off, not 2^-28.
Lane-wise operations round identically on both, so the solo and population kernels agree bit
for bit on either; across the two sets the results differ in the last bits where an estimate
is used (tanh, AdamW's and SDLM's steps).
Caching: numba's cache (__pycache__/*.nbi, *.nbc) is keyed on each kernel's own source
file, so after editing this file or _kernels_common.py delete the _kernels_* cache files.
"""
import numpy as np
from llvmlite import binding as _binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16


def isa_of(f) -> str | None:
    """'avx512', 'avx2' or None from llvmlite's CPU feature map."""
    if f.get("avx512f") and f.get("avx512vl") and f.get("avx512bw"):
        return "avx512"
    if f.get("avx2") and f.get("fma"):
        return "avx2"
    return None


ISA = isa_of(_binding.get_host_cpu_features())


def cpu_reason(features=None) -> str | None:
    """Why the numba kernels cannot run on this CPU (or one with these llvmlite features), or None."""
    if isa_of(_binding.get_host_cpu_features() if features is None else features) is None:
        return "the numba kernels need an x86-64 CPU with AVX2 and FMA (x86-64-v3) or AVX-512"
    return None


_F = ir.FloatType()
_I32 = ir.IntType(32)
_VT = ir.VectorType(_F, LANES)
_VI = ir.VectorType(_I32, LANES)


class V16Type(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


v16 = V16Type()


@register_model(V16Type)
class _V16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VT)


def _ptr(context, builder, aty, arr, idx):
    a = context.make_array(aty)(context, builder, arr)
    return builder.gep(a.data, [idx])


def _to_f32(builder, x):
    if x.type == _F:
        return x
    if isinstance(x.type, ir.DoubleType):
        return builder.fptrunc(x, _F)
    return builder.sitofp(x, _F)


def _intrinsic_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _splat_any(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(_VI, [0] * LANES))


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_VT, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_VT, ir.Undefined), ir.Constant(_VI, [0] * LANES))


@intrinsic
def vload(typingctx, arr, i):
    """16 floats arr.flat[i:i+16] (unaligned)."""
    def cg(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]), _VT.as_pointer())
        return builder.load(p, align=4)
    return v16(arr, i), cg


@intrinsic
def vstore(typingctx, arr, i, v):
    """arr.flat[i:i+16] = v."""
    def cg(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]), _VT.as_pointer())
        builder.store(args[2], p, align=4)
        return context.get_dummy_value()
    return types.void(arr, i, v), cg


@intrinsic
def vsplat(typingctx, x):
    """All 16 lanes = x (a float32 scalar; a load folds into vbroadcastss)."""
    def cg(context, builder, sig, args):
        return _splat(builder, _to_f32(builder, args[0]))
    return v16(x), cg


def _binop(op):
    @intrinsic
    def f(typingctx, a, b):
        def cg(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])
        return v16(a, b), cg
    return f


vadd, vsub, vmul, vdiv = _binop("fadd"), _binop("fsub"), _binop("fmul"), _binop("fdiv")


@intrinsic
def vfma(typingctx, a, b, c):
    """a*b + c with one rounding (llvm.fma: the same instruction in every kernel)."""
    def cg(context, builder, sig, args):
        return builder.call(_intrinsic_fn(builder, "llvm.fma.v16f32", _VT, [_VT] * 3), args)
    return v16(a, b, c), cg


@intrinsic
def ftz_on(typingctx):
    """Set MXCSR's flush-to-zero and denormals-are-zero bits; return the old MXCSR.

    AdamW's second moments of parameters whose gradients stay zero (dead ReLUs) decay into
    denormals, and every operation on a denormal costs ~100 cycles: measured, the modern
    recipe ran 2.5x slower. Flushing changes nothing above 1.2e-38.
    """
    def cg(context, builder, sig, args):
        slot = cgutils.alloca_once(builder, _I32)
        p8 = builder.bitcast(slot, ir.IntType(8).as_pointer())
        builder.call(_intrinsic_fn(builder, "llvm.x86.sse.stmxcsr", ir.VoidType(), [p8.type]), [p8])
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(_I32, 0x8040)), slot)
        builder.call(_intrinsic_fn(builder, "llvm.x86.sse.ldmxcsr", ir.VoidType(), [p8.type]), [p8])
        return builder.sext(old, ir.IntType(64))
    return types.int64(), cg


@intrinsic
def mxcsr_set(typingctx, value):
    """Restore an MXCSR value saved by ftz_on."""
    def cg(context, builder, sig, args):
        slot = cgutils.alloca_once(builder, _I32)
        builder.store(builder.trunc(args[0], _I32), slot)
        p8 = builder.bitcast(slot, ir.IntType(8).as_pointer())
        builder.call(_intrinsic_fn(builder, "llvm.x86.sse.ldmxcsr", ir.VoidType(), [p8.type]), [p8])
        return context.get_dummy_value()
    return types.void(value), cg


def rcp_estimate(builder, x):
    """1/x to 14 bits (vrcp14ps) on AVX-512, exactly (a division) on AVX2; the caller's Newton
    step makes either ~2^-28."""
    if ISA == "avx512":
        fn = _intrinsic_fn(builder, "llvm.x86.avx512.rcp14.ps.512", _VT, [_VT, _VT, ir.IntType(16)])
        return builder.call(fn, [x, ir.Constant(_VT, [0.0] * LANES), ir.Constant(ir.IntType(16), -1)])
    return builder.fdiv(ir.Constant(_VT, [1.0] * LANES), x)


def rsqrt_estimate(builder, x):
    """1/sqrt(x) to 14 bits (vrsqrt14ps) on AVX-512, exactly on AVX2 (x > 0)."""
    if ISA == "avx512":
        fn = _intrinsic_fn(builder, "llvm.x86.avx512.rsqrt14.ps.512", _VT, [_VT, _VT, ir.IntType(16)])
        return builder.call(fn, [x, ir.Constant(_VT, [0.0] * LANES), ir.Constant(ir.IntType(16), -1)])
    sq = builder.call(_intrinsic_fn(builder, "llvm.sqrt.v16f32", _VT, [_VT]), [x])
    return builder.fdiv(ir.Constant(_VT, [1.0] * LANES), sq)


@intrinsic
def vrcp14(typingctx, a):
    """Approximate 1/a, relative error < 2^-14 (rcp_estimate)."""
    def cg(context, builder, sig, args):
        return rcp_estimate(builder, args[0])
    return v16(a), cg


@intrinsic
def vstore_mask(typingctx, arr, i, v, mask):
    """arr.flat[i+l] = v[l] for the lanes l whose bit is set in the integer mask."""
    def cg(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]), _VT.as_pointer())
        m1 = ir.VectorType(ir.IntType(1), LANES)
        m = builder.bitcast(builder.trunc(args[3], ir.IntType(LANES)), m1)
        fn = _intrinsic_fn(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(), [_VT, _VT.as_pointer(), _I32, m1])
        builder.call(fn, [args[2], p, ir.Constant(_I32, 4), m])
        return context.get_dummy_value()
    return types.void(arr, i, v, mask), cg


def _minmax(name):
    @intrinsic
    def f(typingctx, a, b):
        def cg(context, builder, sig, args):
            return builder.call(_intrinsic_fn(builder, name, _VT, [_VT] * 2), args)
        return v16(a, b), cg
    return f


vmin, vmax = _minmax("llvm.minnum.v16f32"), _minmax("llvm.maxnum.v16f32")


@intrinsic
def vpos(typingctx, a, b):
    """b where a > 0 else 0 (ReLU's backward: the gradient passes where the output is positive)."""
    def cg(context, builder, sig, args):
        m = builder.fcmp_ordered(">", args[0], ir.Constant(_VT, [0.0] * LANES))
        return builder.select(m, args[1], ir.Constant(_VT, [0.0] * LANES))
    return v16(a, b), cg


def _perm2_avx2(builder, a, idx, b):
    """vpermt2ps from 8-lane vpermps: each output half permutes the four 8-lane quarters of
    a ++ b by idx's low 3 bits and picks among them by bits 3 and 4."""
    v8, i8 = ir.VectorType(_F, 8), ir.VectorType(_I32, 8)
    perm = _intrinsic_fn(builder, "llvm.x86.avx2.permps", v8, [v8, i8])
    quarters = [*_halves(builder, a, 8), *_halves(builder, b, 8)]
    zero = ir.Constant(i8, [0] * 8)
    out = []
    for ix in _halves(builder, idx, 8):
        p = [builder.call(perm, [q, ix]) for q in quarters]
        hi8 = builder.icmp_unsigned("!=", builder.and_(ix, ir.Constant(i8, [8] * 8)), zero)
        hi16 = builder.icmp_unsigned("!=", builder.and_(ix, ir.Constant(i8, [16] * 8)), zero)
        out.append(builder.select(hi16, builder.select(hi8, p[3], p[2]), builder.select(hi8, p[1], p[0])))
    return builder.shuffle_vector(out[0], out[1], ir.Constant(_VI, list(range(16))))


@intrinsic
def vperm2(typingctx, a, idx_arr, i, b):
    """out[l] = (a ++ b)[idx[l]] with idx = idx_arr.flat[i:i+16] int32 in 0..31 (vpermt2ps; on AVX2
    _perm2_avx2).

    Builds the im2col windows of H2 from its phase vectors (b = the -1 padding) and, in
    the backward pass, the adjoint windows (b = zeros).
    """
    def cg(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[1], args[1], args[2]), _VI.as_pointer())
        idx = builder.load(p, align=4)
        if ISA == "avx512":
            fn = _intrinsic_fn(builder, "llvm.x86.avx512.vpermi2var.ps.512", _VT, [_VT, _VI, _VT])
            return builder.call(fn, [args[0], idx, args[3]])
        return _perm2_avx2(builder, args[0], idx, args[3])
    return v16(a, idx_arr, i, b), cg


@intrinsic
def vgather(typingctx, arr, idx_arr, i):
    """out[l] = arr.flat[idx[l]] with idx = idx_arr.flat[i:i+16] int32."""
    def cg(context, builder, sig, args):
        base = context.make_array(sig.args[0])(context, builder, args[0]).data
        p = builder.bitcast(_ptr(context, builder, sig.args[1], args[1], args[2]), _VI.as_pointer())
        idx = builder.load(p, align=4)
        # llvmlite's gep takes no vector index: form the 16 addresses as integers
        i64 = ir.IntType(64)
        vi64 = ir.VectorType(i64, LANES)
        addr = builder.add(_splat_any(builder, builder.ptrtoint(base, i64), vi64),
                           builder.mul(builder.sext(idx, vi64), ir.Constant(vi64, [4] * LANES)))
        vp = ir.VectorType(_F.as_pointer(), LANES)
        ptrs = builder.inttoptr(addr, vp)
        m1 = ir.VectorType(ir.IntType(1), LANES)
        fn = _intrinsic_fn(builder, "llvm.masked.gather.v16f32.v16p0", _VT, [vp, _I32, m1, _VT])
        return builder.call(fn, [ptrs, ir.Constant(_I32, 4), ir.Constant(m1, [1] * LANES),
                                 ir.Constant(_VT, ir.Undefined)])
    return v16(arr, idx_arr, i), cg


def _halves(builder, v, n):
    """(low n lanes, high n lanes) of the first 2n lanes of v, as n-lane vectors."""
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
    return lo, hi


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes by halving: s8[l] = v[l] + v[l+8], s4[l] = s8[l] + s8[l+4], ... (tree_sum16)."""
    def cg(context, builder, sig, args):
        x, n = args[0], 8
        while n >= 1:
            lo, hi = _halves(builder, x, n)
            x = builder.fadd(lo, hi)
            n //= 2
        return builder.extract_element(x, ir.Constant(_I32, 0))
    return types.float32(v), cg


@intrinsic
def rdtsc(typingctx):
    """The CPU's cycle counter (for the kernels' optional phase profile)."""
    def cg(context, builder, sig, args):
        return builder.call(_intrinsic_fn(builder, "llvm.readcyclecounter", ir.IntType(64), []), [])
    return types.int64(), cg


def _shuf(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(_VI, idx))


@intrinsic
def vtree16(typingctx, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """out[i] = sum of the lanes of v_i, each by vhsum's halving tree (l + l+8, + l+4, + l+2, + l+1).

    A transposing reduction: 30 shuffles and 15 adds for 16 sums instead of 16 separate trees.
    """
    def cg(context, builder, sig, args):
        x = list(args)
        # level 1: lanes 0-7 of pair i hold a[l] + a[l+8], lanes 8-15 b[l] + b[l+8]
        lo, hi = list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))
        x = [builder.fadd(_shuf(builder, x[2 * i], x[2 * i + 1], lo), _shuf(builder, x[2 * i], x[2 * i + 1], hi))
             for i in range(8)]
        # level 2: groups of 4 lanes per source vector: + l+4
        lo = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
        hi = [l + 4 for l in lo]
        x = [builder.fadd(_shuf(builder, x[2 * i], x[2 * i + 1], lo), _shuf(builder, x[2 * i], x[2 * i + 1], hi))
             for i in range(4)]
        # level 3: pairs of lanes: + l+2
        lo = [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]
        hi = [l + 2 for l in lo]
        x = [builder.fadd(_shuf(builder, x[2 * i], x[2 * i + 1], lo), _shuf(builder, x[2 * i], x[2 * i + 1], hi))
             for i in range(2)]
        # level 4: + l+1
        lo = list(range(0, 32, 2))
        hi = [l + 1 for l in lo]
        return builder.fadd(_shuf(builder, x[0], x[1], lo), _shuf(builder, x[0], x[1], hi))
    return v16(*([v16] * 16)), cg


@intrinsic
def vmac4(typingctx, A, ia, B, ib):
    """sum over ph = 0..3 of A.flat[ia+16ph : +16] * B.flat[ib+16ph : +16], in ph order (mul, then fmas)."""
    def cg(context, builder, sig, args):
        def ld(k, i, off):
            pi = builder.add(i, ir.Constant(i.type, off))
            return builder.load(builder.bitcast(_ptr(context, builder, sig.args[k], args[k], pi), _VT.as_pointer()), align=4)
        fma = _intrinsic_fn(builder, "llvm.fma.v16f32", _VT, [_VT] * 3)
        acc = builder.fmul(ld(0, args[1], 0), ld(2, args[3], 0))
        for ph in range(1, 4):
            acc = builder.call(fma, [ld(0, args[1], 16 * ph), ld(2, args[3], 16 * ph), acc])
        return acc
    return v16(A, ia, B, ib), cg


@njit(inline="always")
def vzero():
    return vsplat(np.float32(0.0))


# tanh(x) ~ x * P(x^2) / Q(x^2) on |x| <= 9 (beyond, float32 tanh is +-1): a rational
# fit made for this project (minimax on the relative error in float64, then rounded to
# float32). Measured against float64 tanh over 2.4M float32 inputs: max 5.1 ulp, mean
# 0.6 ulp; numpy's float32 tanh is ~1.4 ulp. Lane-wise, so it vectorizes.
_TP = [1.0, 0.13084028661251068, 0.00310397706925869, 1.1154526873724535e-05, -2.0226114116894678e-08,
       5.278376000172891e-11, -8.48980580931899e-14]
_TQ = [1.0, 0.4641735553741455, 0.024495260789990425, 0.0002546175674069673]
TP0, TP1, TP2, TP3, TP4, TP5, TP6 = (np.float32(c) for c in _TP)
TQ1, TQ2, TQ3 = (np.float32(c) for c in _TQ[1:])
TCLAMP = np.float32(9.0)


@njit(inline="always")
def vtanh(x):
    x = vmin(vmax(x, vsplat(-TCLAMP)), vsplat(TCLAMP))
    t = vmul(x, x)
    p = vfma(vsplat(TP6), t, vsplat(TP5))
    p = vfma(p, t, vsplat(TP4))
    p = vfma(p, t, vsplat(TP3))
    p = vfma(p, t, vsplat(TP2))
    p = vfma(p, t, vsplat(TP1))
    p = vfma(p, t, vsplat(TP0))
    q = vfma(vsplat(TQ3), t, vsplat(TQ2))
    q = vfma(q, t, vsplat(TQ1))
    q = vfma(q, t, vsplat(np.float32(1.0)))
    # x*p/q with 1/q from the 14-bit estimate and one Newton step (~2^-28): a division
    # (vdivps) would cost ~10 cycles a vector, the populations' biggest single stall
    r = vrcp14(q)
    r = vfma(vfma(vsub(vsplat(np.float32(0.0)), q), r, vsplat(np.float32(1.0))), r, r)
    # the rational overshoots 1 by an ulp near the clamp: keep |tanh| <= 1 (so 1 - h^2 >= 0)
    one = vsplat(np.float32(1.0))
    return vmin(vmax(vmul(vmul(x, p), r), vsub(vsplat(np.float32(0.0)), one)), one)
