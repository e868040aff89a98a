"""Lane-wise pieces shared by the solo and population kernels.

Both kernels call these on 16-lane vectors; whether a lane is an image position (solo)
or a replica (population), it goes through the same operations in the same order, which
is what makes replica k of a population bit-identical to a solo run.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._simd import (_I32, LANES, _VT, _intrinsic_fn, _ptr, _splat, rcp_estimate, rsqrt_estimate, vadd, vload, vmax,
                    vmul, vpos, vsplat, vsub, vtanh)

# codes passed to the kernels
ACT = {"tanh": 0, "relu": 1, "scaled_tanh": 2}
OUT = {"tanh": 0, "relu": 1, "scaled_tanh": 2, "none": 3}   # the hidden codes, and none (logits)
LOSS = {"mse": 0, "ce": 1}
# grad: write the gradient into M instead of stepping (vstep); accumulate: add it to M (the
# population engine's minibatch gradient: the sum over a batch at fixed weights); accumulate_gn:
# accumulate, and add each example's Gauss-Newton diagonal estimate (sdlm's) to V (solo kernel only)
OPT = {"sgd": 0, "adamw": 1, "grad": 2, "sdlm": 3, "accumulate": 4, "accumulate_gn": 5}

F0, F1 = np.float32(0.0), np.float32(1.0)
ST_A = np.float32(1.7159)                       # LeCun's scaled tanh: ST_A * tanh(ST_B * x)
ST_B = np.float32(2.0 / 3.0)
ST_AB = np.float32(1.7159 * 2.0 / 3.0)
MSE_G = np.float32(0.2)                         # d mean_10((y-t)^2) / dy = 0.2 (y-t); 0.1f*2 == 0.2f


@njit
def abuf(n, fill):
    """A float32 work array of n elements filled with `fill`, 64-byte aligned: a 16-lane
    vector at a multiple of 16 is then one cache line (numba's own arrays are only
    32-byte aligned, and split lines cost the population kernel ~1/4 of its time)."""
    b = np.full(n + 16, np.float32(fill))
    off = ((64 - b.ctypes.data % 64) % 64) // 4
    return b[off:off + n]


def aligned(a) -> np.ndarray:
    """a itself if it is a 64-byte aligned C-contiguous float32 array, else aligned_copy(a)."""
    if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % 64 == 0:
        return a
    return aligned_copy(a)


def aligned_copy(a) -> np.ndarray:
    """A 64-byte aligned, C-contiguous float32 copy of a (for parameters and inputs)."""
    a = np.asarray(a, np.float32)
    buf = np.empty(a.size + 16, np.float32)
    off = ((64 - buf.ctypes.data % 64) % 64) // 4
    out = buf[off:off + a.size].reshape(a.shape)
    out[...] = a
    return out


@njit(inline="always")
def act_fwd(z, act):
    """-> (h, d) with d = dh/dz, so the backward pass is dz = dh * d for every activation."""
    if act == 0:
        h = vtanh(z)
        return h, vsub(vsplat(F1), vmul(h, h))
    if act == 1:
        h = vmax(z, vsplat(F0))
        return h, vpos(h, vsplat(F1))          # torch: the gradient passes where the output > 0
    t = vtanh(vmul(z, vsplat(ST_B)))
    return vmul(t, vsplat(ST_A)), vmul(vsub(vsplat(F1), vmul(t, t)), vsplat(ST_AB))


@njit(inline="always")
def out_fwd(z, out_act):
    """-> (y, dy/dz) of the output nonlinearity (OUT codes)."""
    if out_act == 3:
        return z, vsplat(F1)
    return act_fwd(z, out_act)


@njit(inline="always")
def tree16(part):
    """The population kernel's halving tree over 16 partial vectors part[0:256] ((l + l+8) + ...),
    per lane the solo kernel's vhsum / vtree16 of the same 16 partials."""
    s0, s1 = vadd(vload(part, 0), vload(part, 128)), vadd(vload(part, 16), vload(part, 144))
    s2, s3 = vadd(vload(part, 32), vload(part, 160)), vadd(vload(part, 48), vload(part, 176))
    s4, s5 = vadd(vload(part, 64), vload(part, 192)), vadd(vload(part, 80), vload(part, 208))
    s6, s7 = vadd(vload(part, 96), vload(part, 224)), vadd(vload(part, 112), vload(part, 240))
    s0, s1, s2, s3 = vadd(s0, s4), vadd(s1, s5), vadd(s2, s6), vadd(s3, s7)
    s0, s1 = vadd(s0, s2), vadd(s1, s3)
    return vadd(s0, s1)


@njit(inline="always")
def step_constants(k, lr, opt, step, wd, b1, b2, eps, mu, gamma):
    """Fill k for one step (float64 maths like torch's Python-side scalars, then float32)."""
    k[0] = np.float32(-lr)
    if opt == 3:                         # eager: h.mul_(1 - gamma).add_(new, alpha=gamma); mu + h
        k[1] = np.float32(1.0 - gamma)
        k[2] = np.float32(gamma)
        k[3] = np.float32(mu)
    if opt == 1:
        lr64 = np.float64(lr)
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        k[1] = np.float32(1.0 - lr64 * wd)
        k[2] = np.float32(1.0 - b1)
        k[3] = np.float32(1.0 - b2)
        k[4] = np.float32(b2)
        k[5] = np.float32(1.0 / math.sqrt(bc2))
        k[6] = np.float32(eps)
        k[7] = np.float32(-(lr64 / bc1))


@njit(inline="always")
def loss_curv(y, dout, o, st, loss, s):
    """s[o + q*st] = the Gauss-Newton curvature of the loss in output pre-activation q
    (methods/sdlm.py: mse f'(z)^2 * 2/10; ce p(1-p), times f'(z)^2 = 1 for logits). Layout as loss_grad."""
    if loss == 0:
        for q in range(10):
            d = dout[o + q * st]
            s[o + q * st] = (d * d) * MSE_G
    else:
        mx = y[o]
        for q in range(1, 10):
            mx = max(mx, y[o + q * st])
        t = F0
        for q in range(10):
            t += np.float32(math.exp(y[o + q * st] - mx))
        ls = np.float32(math.log(t))
        for q in range(10):
            p = np.float32(math.exp(y[o + q * st] - mx - ls))
            d = dout[o + q * st]
            s[o + q * st] = (p * (F1 - p)) * (d * d)


@njit(inline="always")
def loss_grad(y, dout, o, st, lab, loss, smooth, g):
    """g[o + q*st] = dL/dz_q for the 10 outputs, from y[o + q*st] and dout = dy/dz likewise.

    mse: torch.mean((y - t)^2), t = +-1; ce: softmax cross-entropy on y (logits), batch of one,
    against the target (1 - smooth) on the label + smooth / 10 everywhere (label smoothing;
    smooth = 0 is the plain one-hot target, to the bit).
    Scalar code on one replica: solo passes (o=0, st=1), the population (o=lane, st=16).
    """
    if loss == 0:
        for q in range(10):
            t = F1 if q == lab else -F1
            g[o + q * st] = (MSE_G * (y[o + q * st] - t)) * dout[o + q * st]
    else:
        mx = y[o]
        for q in range(1, 10):
            mx = max(mx, y[o + q * st])
        s = F0
        for q in range(10):
            s += np.float32(math.exp(y[o + q * st] - mx))
        ls = np.float32(math.log(s))
        sm = np.float32(smooth)
        off, on = sm / np.float32(10.0), (F1 - sm) + sm / np.float32(10.0)
        for q in range(10):
            p = np.float32(math.exp(y[o + q * st] - mx - ls))
            g[o + q * st] = (p - (on if q == lab else off)) * dout[o + q * st]


def _vconst(x):
    return ir.Constant(_VT, [x] * LANES)


def _recip(builder, fma, den):
    """1/den from the 14-bit estimate (vrcp14ps; exact on AVX2) and one Newton step (~2^-28)."""
    r = rcp_estimate(builder, den)
    return builder.call(fma, [builder.call(fma, [builder.fsub(_vconst(0.0), den), r, _vconst(1.0)]), r, r])


@intrinsic
def vstep(typingctx, P, M, V, i, g, k, opt):
    """Hand over the gradient g of P.flat[i:i+16] right after the parameters' last use.

    opt 0 (SGD):   P = fma(k[0], g, P)                     k[0] = -lr
    opt 1 (AdamW): torch.optim.AdamW's single-tensor step with moments M, V:
                   P *= k[1] (1 - lr wd); M += k[2] (g - M) (lerp, k[2] = 1 - b1);
                   V = V k[4] + k[3] g g; P += k[7] M / (sqrt(V) k[5] + k[6])
                   (k[5] = 1/sqrt(1 - b2^t), k[6] = eps, k[7] = -lr / (1 - b1^t))
    opt 2 (grad):  M = g (the gradient, for checks; nothing is stepped)
    opt 4 (accumulate): M += g (nothing is stepped: a minibatch's gradient summed over its examples)
    opt 5 (accumulate_gn): M += g as opt 4; the solo kernel adds this example's Gauss-Newton
                   diagonal estimate to V itself (after the curvature pass, W3's at W3's step
                   site), so V ends as the batch's sum of sdlm's estimates; nothing is stepped
    opt 3 (SDLM):  methods/sdlm.py's sdlm_update with M = h (the running Gauss-Newton
                   diagonal) and V = this example's estimate: M = fma(V, k[2], M k[1])
                   (k[1] = 1 - gamma, k[2] = gamma); P += k[0] g / (M + k[3]) (k[3] = mu > 0,
                   1/x from the 14-bit estimate and one Newton step, ~2^-28 as for AdamW)
    An intrinsic, so the hot loops pass no array to a helper (numba would refcount it).
    """
    def cg(context, builder, sig, args):
        Pa, Ma, Va, idx, g, ka, opt = args
        at = lambda j, a: builder.bitcast(_ptr(context, builder, sig.args[j], a, idx), _VT.as_pointer())  # noqa: E731
        kz = context.make_array(sig.args[5])(context, builder, ka).data
        kk = lambda j: _splat(builder, builder.load(builder.gep(kz, [ir.Constant(_I32, j)])))  # noqa: E731
        fma = _intrinsic_fn(builder, "llvm.fma.v16f32", _VT, [_VT] * 3)
        is_adam = builder.icmp_signed("==", opt, ir.Constant(opt.type, 1))
        with builder.if_else(is_adam) as (adam, other):
            with adam:
                pp, pm, pv = at(0, Pa), at(1, Ma), at(2, Va)
                w = builder.fmul(builder.load(pp, align=4), kk(1))
                m = builder.load(pm, align=4)
                m = builder.call(fma, [kk(2), builder.fsub(g, m), m])
                v = builder.call(fma, [builder.fmul(g, kk(3)), g, builder.fmul(builder.load(pv, align=4), kk(4))])
                # sqrt(V) and the division by the denominator from the 14-bit estimates and one
                # Newton step each (~2^-28; a vsqrtps + 2 vdivps cost ~35 cycles a vector and
                # made AdamW double the solo step on AVX-512; AVX2 has no 14-bit estimates and
                # takes the exact ones, rcp_estimate/rsqrt_estimate); 1e-35 keeps rsqrt(0) = inf out (sqrt -> 3e-18,
                # far below eps's last bit)
                c = _vconst
                vv = builder.call(_intrinsic_fn(builder, "llvm.maxnum.v16f32", _VT, [_VT] * 2), [v, c(1e-35)])
                y = rsqrt_estimate(builder, vv)
                hy = builder.fmul(builder.fmul(vv, c(0.5)), y)            # v y / 2
                y = builder.fmul(y, builder.call(fma, [builder.fsub(c(0.0), hy), y, c(1.5)]))
                sq = builder.fmul(vv, y)
                den = builder.call(fma, [sq, kk(5), kk(6)])               # k[5] = 1 / sqrt(1 - b2^t)
                builder.store(builder.call(fma, [kk(7), builder.fmul(m, _recip(builder, fma, den)), w]), pp, align=4)
                builder.store(m, pm, align=4)
                builder.store(v, pv, align=4)
            with other:
                is_lm = builder.icmp_signed("==", opt, ir.Constant(opt.type, 3))
                with builder.if_else(is_lm) as (lm, plain):
                    with lm:
                        _lm_step(builder, fma, at(0, Pa), at(1, Ma), g, builder.load(at(2, Va), align=4), kk)
                    with plain:
                        is_sgd = builder.icmp_signed("==", opt, ir.Constant(opt.type, 0))
                        with builder.if_else(is_sgd) as (sgd, grad):
                            with sgd:
                                pp = at(0, Pa)
                                builder.store(builder.call(fma, [kk(0), g, builder.load(pp, align=4)]), pp, align=4)
                            with grad:
                                is_acc = builder.or_(builder.icmp_signed("==", opt, ir.Constant(opt.type, 4)),
                                                     builder.icmp_signed("==", opt, ir.Constant(opt.type, 5)))
                                with builder.if_else(is_acc) as (acc, store):
                                    with acc:
                                        pm = at(1, Ma)
                                        builder.store(builder.fadd(builder.load(pm, align=4), g), pm, align=4)
                                    with store:
                                        builder.store(g, at(1, Ma), align=4)
        return context.get_dummy_value()
    return types.void(P, M, V, i, g, k, opt), cg


def _lm_step(builder, fma, pp, ph, g, hn, kk):
    """SDLM at pointers pp (P), ph (h): h = fma(hn, k[2], h k[1]); P = fma(k[0] g, 1/(h + k[3]), P)."""
    h = builder.call(fma, [hn, kk(2), builder.fmul(builder.load(ph, align=4), kk(1))])
    r = _recip(builder, fma, builder.fadd(h, kk(3)))
    builder.store(builder.call(fma, [builder.fmul(g, kk(0)), r, builder.load(pp, align=4)]), pp, align=4)
    builder.store(h, ph, align=4)


@intrinsic
def vstep_h(typingctx, P, M, i, g, hn, k):
    """vstep's SDLM step (opt 3) with this example's estimate hn given as a vector, not read
    from V: for W3, whose estimate is the outer product s3 x h2^2, computed where it is used
    (a population's W3 estimate would be 368 KB written and read back each step)."""
    def cg(context, builder, sig, args):
        Pa, Ma, idx, g, hn, ka = args
        at = lambda j, a: builder.bitcast(_ptr(context, builder, sig.args[j], a, idx), _VT.as_pointer())  # noqa: E731
        kz = context.make_array(sig.args[5])(context, builder, ka).data
        kk = lambda j: _splat(builder, builder.load(builder.gep(kz, [ir.Constant(_I32, j)])))  # noqa: E731
        _lm_step(builder, _intrinsic_fn(builder, "llvm.fma.v16f32", _VT, [_VT] * 3), at(0, Pa), at(1, Ma), g, hn, kk)
        return context.get_dummy_value()
    return types.void(P, M, i, g, hn, k), cg
