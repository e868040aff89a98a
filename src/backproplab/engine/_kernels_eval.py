"""The evaluation kernel: Net1989's forward pass only, for R replicas and N images.

Lanes = images: one 16-lane vector holds one unit's value for 16 images, so every
multiply-add does useful work whatever R is (the population kernel's lanes are replicas:
at R = 8 half of them would idle) and a weight is one scalar broadcast into the fused
multiply-add. The activation layouts are the population kernel's with images in place of
replicas (_kernels_pop.XP, HP): the 20x20 input and the 12 H1 planes of 12x12 are stored
with their -1 borders, lanes innermost, so the convolutions read the padding like any
other input. The weights are read in torch's layout (PARAM_NAMES order, one (9760,) row
per replica), nothing is repacked.

Per block of 16 images: the input is transposed into xpad once, then for each replica
  H1   planes c, c+1 x one row of 8 positions = 16 accumulators, bias first, taps in order
  H2   one connection group (4 output planes that read the same 8 input planes, H2_TABLE)
       x one row of 4 positions = 16 accumulators; each loaded window vector feeds 4 of them
  H3   10 units at a time, over the 192 H2 units in torch's flatten order
  out  10 accumulators over the 30 H3 units, then out_act
Activations come from _kernels_common.act_fwd / out_fwd (the training kernels' own), with
one difference: a NaN pre-activation stays NaN here (vkeepnan), as torch's tanh and ReLU
keep it, so a diverged replica evaluates to NaN losses exactly as the module path reports
them (the training kernels' tanh clamp and ReLU max would map NaN to a number).

Sums run in another order than torch's convolutions, so outputs agree with the modules to
float tolerance (tests/test_eval_kernel.py), not bit for bit. One thread: the project runs
parallel work as processes (pools, --jobs), never as numba threads.
Caching as the other kernels: after editing this file, _simd.py, _kernels_common.py or
_kernels_pop.py delete the engine's __pycache__/_kernels_* files.
"""
import numpy as np
from numba import njit
from numba.extending import intrinsic

from ..models.net1989 import H2_TABLE, PARAM_NAMES, PARAM_SHAPES
from ._kernels_common import abuf, act_fwd, out_fwd
from ._kernels_pop import HP, XP
from ._layout import L
from ._simd import _ptr, _splat, ftz_on, mxcsr_set, v16, vfma, vload, vstore

_cols = np.cumsum([0] + [int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES])
OW1, OB1, OW2, OB2, OW3, OB3, OW4, OB4 = (int(c) for c in _cols[:-1])
NP = int(_cols[-1])                                 # 9,760 floats per replica
# H2 is computed per connection group: the 4 output planes of a group read the same 8 planes
assert all((H2_TABLE[4 * g:4 * g + 4] == H2_TABLE[4 * g]).all() for g in range(3))


@intrinsic
def vbcast(typingctx, arr, i):
    """All 16 lanes = arr.flat[i] (one scalar load, broadcast; no index checks: callers own the layout)."""
    def cg(context, builder, sig, args):
        return _splat(builder, builder.load(_ptr(context, builder, sig.args[0], args[0], args[1]), align=4))
    return v16(arr, i), cg


@intrinsic
def vkeepnan(typingctx, z, h):
    """h, except where z is NaN: there z (NaN) itself."""
    def cg(context, builder, sig, args):
        return builder.select(builder.fcmp_unordered("uno", args[0], args[0]), args[0], args[1])
    return v16(z, h), cg


@njit(inline="always")
def act_eval(z, act):
    return vkeepnan(z, act_fwd(z, act)[0])


@njit(inline="always")
def out_eval(z, out_act):
    return vkeepnan(z, out_fwd(z, out_act)[0])


@njit(cache=True)
def eval_pass(X, W, out, act, out_act, table):
    """out[r, n] = Net1989's eval-mode outputs of replica r on image n.

    X (N, 256) float32 C-contiguous images (the net's 16x16 inputs, row-major); W (R * 9760,)
    float32 C-contiguous, replica r's parameters at r * 9760 in PARAM_NAMES order; out (R, N, 10)
    float32; act: ACT code, out_act: OUT code (_kernels_common); table: H2_TABLE (12, 8) int64.
    """
    N, R = X.shape[0], out.shape[0]
    xpad = abuf(400 * L + L, -1.0)               # 64-byte aligned: a vector is one cache line
    h1p = abuf(12 * HP, -1.0)
    h2 = abuf(192 * L, 0.0)
    h3 = abuf(30 * L, 0.0)
    y = abuf(10 * L, 0.0)
    m1 = np.float32(-1.0)
    mx = ftz_on()
    for n0 in range(0, N, L):
        nv = min(L, N - n0)
        # ---- input: lane l = image n0 + l; lanes past the end see a blank (-1) image
        for i in range(16):
            for j in range(16):
                e = XP(i + 2, j + 2)
                for ll in range(nv):
                    xpad[e + ll] = X[n0 + ll, i * 16 + j]
                for ll in range(nv, L):
                    xpad[e + ll] = m1
        for r in range(R):
            wb = r * NP
            # ---- H1: planes c, c+1 x a row of 8 positions
            for c in range(0, 12, 2):
                wa0 = wb + OW1 + c * 25
                for oy in range(8):
                    bo = wb + OB1 + c * 64 + oy * 8
                    a0, a1, a2, a3 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3)
                    a4, a5, a6, a7 = vbcast(W, bo + 4), vbcast(W, bo + 5), vbcast(W, bo + 6), vbcast(W, bo + 7)
                    bo += 64
                    e0, e1, e2, e3 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3)
                    e4, e5, e6, e7 = vbcast(W, bo + 4), vbcast(W, bo + 5), vbcast(W, bo + 6), vbcast(W, bo + 7)
                    for ky in range(5):
                        for kx in range(5):
                            wa = vbcast(W, wa0 + ky * 5 + kx)
                            we = vbcast(W, wa0 + 25 + ky * 5 + kx)
                            xb = XP(2 * oy + ky, kx)
                            x = vload(xpad, xb)
                            a0, e0 = vfma(wa, x, a0), vfma(we, x, e0)
                            x = vload(xpad, xb + 2 * L)
                            a1, e1 = vfma(wa, x, a1), vfma(we, x, e1)
                            x = vload(xpad, xb + 4 * L)
                            a2, e2 = vfma(wa, x, a2), vfma(we, x, e2)
                            x = vload(xpad, xb + 6 * L)
                            a3, e3 = vfma(wa, x, a3), vfma(we, x, e3)
                            x = vload(xpad, xb + 8 * L)
                            a4, e4 = vfma(wa, x, a4), vfma(we, x, e4)
                            x = vload(xpad, xb + 10 * L)
                            a5, e5 = vfma(wa, x, a5), vfma(we, x, e5)
                            x = vload(xpad, xb + 12 * L)
                            a6, e6 = vfma(wa, x, a6), vfma(we, x, e6)
                            x = vload(xpad, xb + 14 * L)
                            a7, e7 = vfma(wa, x, a7), vfma(we, x, e7)
                    ro = c * HP + ((oy + 2) * 12 + 2) * L            # pre-activations, inside the border
                    vstore(h1p, ro, a0)
                    vstore(h1p, ro + L, a1)
                    vstore(h1p, ro + 2 * L, a2)
                    vstore(h1p, ro + 3 * L, a3)
                    vstore(h1p, ro + 4 * L, a4)
                    vstore(h1p, ro + 5 * L, a5)
                    vstore(h1p, ro + 6 * L, a6)
                    vstore(h1p, ro + 7 * L, a7)
                    ro += HP
                    vstore(h1p, ro, e0)
                    vstore(h1p, ro + L, e1)
                    vstore(h1p, ro + 2 * L, e2)
                    vstore(h1p, ro + 3 * L, e3)
                    vstore(h1p, ro + 4 * L, e4)
                    vstore(h1p, ro + 5 * L, e5)
                    vstore(h1p, ro + 6 * L, e6)
                    vstore(h1p, ro + 7 * L, e7)
            for c in range(12):                                  # a flat loop: the chains overlap
                for oy in range(8):
                    for ox in range(8):
                        e = c * HP + ((oy + 2) * 12 + ox + 2) * L
                        vstore(h1p, e, act_eval(vload(h1p, e), act))
            # ---- H2: group g's planes 4g..4g+3 x a row of 4 positions
            for g in range(3):
                o = 4 * g
                for oy2 in range(4):
                    bo = wb + OB2 + o * 16 + oy2 * 4
                    a0, a1, a2, a3 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3)
                    bo += 16
                    b0, b1, b2, b3 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3)
                    bo += 16
                    c0, c1, c2, c3 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3)
                    bo += 16
                    d0, d1, d2, d3 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3)
                    for j in range(8):
                        pl = table[o, j] * HP
                        wj = wb + OW2 + o * 200 + j * 25
                        for ky in range(5):
                            for kx in range(5):
                                k = wj + ky * 5 + kx
                                wa, wbv = vbcast(W, k), vbcast(W, k + 200)
                                wc, wd = vbcast(W, k + 400), vbcast(W, k + 600)
                                xb = pl + ((2 * oy2 + ky) * 12 + kx) * L
                                x = vload(h1p, xb)
                                a0, b0, c0, d0 = vfma(wa, x, a0), vfma(wbv, x, b0), vfma(wc, x, c0), vfma(wd, x, d0)
                                x = vload(h1p, xb + 2 * L)
                                a1, b1, c1, d1 = vfma(wa, x, a1), vfma(wbv, x, b1), vfma(wc, x, c1), vfma(wd, x, d1)
                                x = vload(h1p, xb + 4 * L)
                                a2, b2, c2, d2 = vfma(wa, x, a2), vfma(wbv, x, b2), vfma(wc, x, c2), vfma(wd, x, d2)
                                x = vload(h1p, xb + 6 * L)
                                a3, b3, c3, d3 = vfma(wa, x, a3), vfma(wbv, x, b3), vfma(wc, x, c3), vfma(wd, x, d3)
                    u = (o * 16 + oy2 * 4) * L                   # torch's flatten order: plane, row, column
                    vstore(h2, u, a0)
                    vstore(h2, u + L, a1)
                    vstore(h2, u + 2 * L, a2)
                    vstore(h2, u + 3 * L, a3)
                    u += 16 * L
                    vstore(h2, u, b0)
                    vstore(h2, u + L, b1)
                    vstore(h2, u + 2 * L, b2)
                    vstore(h2, u + 3 * L, b3)
                    u += 16 * L
                    vstore(h2, u, c0)
                    vstore(h2, u + L, c1)
                    vstore(h2, u + 2 * L, c2)
                    vstore(h2, u + 3 * L, c3)
                    u += 16 * L
                    vstore(h2, u, d0)
                    vstore(h2, u + L, d1)
                    vstore(h2, u + 2 * L, d2)
                    vstore(h2, u + 3 * L, d3)
            for u in range(192):
                vstore(h2, u * L, act_eval(vload(h2, u * L), act))
            # ---- H3: units m0..m0+9 at once
            for m0 in range(0, 30, 10):
                bo = wb + OB3 + m0
                a0, a1, a2, a3, a4 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3), \
                    vbcast(W, bo + 4)
                a5, a6, a7, a8, a9 = vbcast(W, bo + 5), vbcast(W, bo + 6), vbcast(W, bo + 7), vbcast(W, bo + 8), \
                    vbcast(W, bo + 9)
                w3 = wb + OW3 + m0 * 192
                for u in range(192):
                    hv = vload(h2, u * L)
                    k = w3 + u
                    a0, a1 = vfma(vbcast(W, k), hv, a0), vfma(vbcast(W, k + 192), hv, a1)
                    a2, a3 = vfma(vbcast(W, k + 384), hv, a2), vfma(vbcast(W, k + 576), hv, a3)
                    a4, a5 = vfma(vbcast(W, k + 768), hv, a4), vfma(vbcast(W, k + 960), hv, a5)
                    a6, a7 = vfma(vbcast(W, k + 1152), hv, a6), vfma(vbcast(W, k + 1344), hv, a7)
                    a8, a9 = vfma(vbcast(W, k + 1536), hv, a8), vfma(vbcast(W, k + 1728), hv, a9)
                for k, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7, a8, a9)):
                    vstore(h3, (m0 + k) * L, act_eval(a, act))
            # ---- output layer
            bo = wb + OB4
            a0, a1, a2, a3, a4 = vbcast(W, bo), vbcast(W, bo + 1), vbcast(W, bo + 2), vbcast(W, bo + 3), vbcast(W, bo + 4)
            a5, a6, a7, a8, a9 = vbcast(W, bo + 5), vbcast(W, bo + 6), vbcast(W, bo + 7), vbcast(W, bo + 8), \
                vbcast(W, bo + 9)
            w4 = wb + OW4
            for m in range(30):
                hv = vload(h3, m * L)
                k = w4 + m
                a0, a1 = vfma(vbcast(W, k), hv, a0), vfma(vbcast(W, k + 30), hv, a1)
                a2, a3 = vfma(vbcast(W, k + 60), hv, a2), vfma(vbcast(W, k + 90), hv, a3)
                a4, a5 = vfma(vbcast(W, k + 120), hv, a4), vfma(vbcast(W, k + 150), hv, a5)
                a6, a7 = vfma(vbcast(W, k + 180), hv, a6), vfma(vbcast(W, k + 210), hv, a7)
                a8, a9 = vfma(vbcast(W, k + 240), hv, a8), vfma(vbcast(W, k + 270), hv, a9)
            for q, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7, a8, a9)):
                vstore(y, q * L, out_eval(a, out_act))
            for ll in range(nv):
                for q in range(10):
                    out[r, n0 + ll, q] = y[q * L + ll]
    mxcsr_set(mx)
