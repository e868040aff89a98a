"""The solo kernel: one Net1989 replica, one example per step, lanes = image positions.

Layouts are in _layout.py. One step, in the order of the code:
  input  xpad (20x20, -1 border) <- the (shifted) image; X4 = xpad split by 4 (gathers);
         P1[k, ph] = a 4x4 window of an X4 block (one permute per vector)
  H1     z1[c, ph] = b1 + sum_k w1[c,k] P1[k, ph]          (bias first, taps in order)
  H2     window(i, k) = permute(h1[i, phase(k)], -1) ; z2[o] = b2 + sum over o's planes in
         increasing order, taps in order, of w2[o, i, k] * window(i, k)
  noise  spatial dropout's plane factors on the activated H1 (maps); DropConnect's weight
         factors on H3 (dcm): the model methods' masks, drawn by the engine
  H3     per unit: lane partials over the 12 H2 planes, halving-tree sum (vhsum), + b3
  out    two 16-lane partials, tree sum, + b4 ; loss gradient (scalar, common code), plus a
         distillation term's when given (LwF's, _soft_grad: the solo kernel only)
  back   dh3 over q in order; dh2 over m in order; dh1 per plane and phase from the adjoint
         windows; dW2[o] = sum over H2 positions in order of dz2 * H1T runs (H1T: the 12
         planes of each padded H1 position side by side); dW1 by 16-way transposing trees
Each gradient is handed to vstep right after the parameter's last use, which steps the
parameter in place (SGD, AdamW or SDLM; or stores or accumulates the gradient). SDLM's
curvature estimate is written by a separate pass between the loss and the backward pass
(_kernels_sdlm.py), from the same weights the gradient sees: into V for the per-example
step (opt 3), or (opt 5, the population engine's minibatch sdlm) into a scratch vector that
is added to V, W3's outer product s3 x h2^2 added at W3's step site, so V ends as the
batch's sum of the estimates next to the gradient's sum in M. The population kernel
performs the same roundings in the same order for each replica (see _kernels_pop.py).

Profile: BACKPROPLAB_PROFILE=1 compiles cycle counters in (prof gets 8 phases per step,
int64 (8 N,); such a build is never cached). Medians on this machine, ~15k cycles a step:
input 1.0k, H1 2.0k, H2 2.6k, H3 + out 1.4k, backward out + H3 1.6k, dh1 3.4k,
dW2 (with the H1T gathers) 4.5k, dW1 3.0k (shared core: +-20%).
"""
import math
import os

import numpy as np
from numba import njit

from ..models.net1989 import PARAM_NAMES
from ._kernels_common import abuf, act_fwd, loss_grad, out_fwd, step_constants, vstep, vstep_h
from ._kernels_sdlm import solo_curvature, solo_workspace
from ._layout import H1TS, SOLO_OFFSETS, W2R
from ._simd import (ftz_on, mxcsr_set, rdtsc, vadd, vfma, vgather, vhsum, vload, vmac4, vmul, vperm2, vsplat, vstore,
                    vstore_mask, vtree16, vzero)

F0, F1 = np.float32(0.0), np.float32(1.0)
PROF = bool(os.environ.get("BACKPROPLAB_PROFILE"))  # compile the phase timers in
OW1, OB1, OW2, OB2, OW3, OB3, OW4, OB4 = (SOLO_OFFSETS[n] for n in PARAM_NAMES)
NSOLO = SOLO_OFFSETS["total"]
W2O = 5 * W2R                                       # floats per output plane of W2


@njit(cache=not PROF)   # a profiling build must not land in the cache
def solo_pass(X, labels, lrs, shifts, keep, maps, dcm, scale, P, M, V, step,
              act, out_act, loss, opt, wd, b1, b2, eps, mu, gamma, smooth, tb, prof, soft, units, lam, temp):
    """Train one replica on X[n], n in order.

    P: the parameters, flat solo layout (SOLO_OFFSETS), stepped in place. M, V: AdamW
    moments (same layout); with opt=2 nothing is stepped and M receives the gradient; with
    opt=3 (SDLM) M is the running curvature and V receives this example's estimate
    (_kernels_sdlm.py); with opt=4 M accumulates the gradient, and with opt=5 also V the
    estimates (their sums over X, in the solo layout; M and V must be distinct). shifts (N, 2)
    int8 or (0, 2); keep (N, 192) bool or (0, 192) with scale = 1/(1-p). The model noise of
    ModNet's methods, as factors (0 or 1/(1-p)) the engine draws from each replica's noise
    stream: maps (N, 12) float32 or (0, 12), spatial dropout, multiplies each activated H1
    plane (and so its slope: dz1 = dh1 * factor * f'); dcm (N, 5760) float32 or (0, 5760),
    DropConnect, multiplies each H3 weight (torch order [unit, input]) in the forward, in dh2
    and in dW3 (the autograd path's w3 * mask). step: int64 (1,), the optimizer's step count.
    smooth: label smoothing of the cross-entropy's target (0: none). tb: solo_tables() as a
    tuple. prof: int64 (16,), cycles per phase when PROF is set.
    soft (N, 10) float32 or (0, 10): a distillation term's target probabilities per example (LwF:
    the frozen net's softmax(z_old[u] / temp), 0 off the units), added to the loss as
    lam temp^2 KL(soft[n] || softmax(y[u] / temp)) over the units u where units (10,) float32 is 1
    (_soft_grad); (0, 10) and units (0,): no such term.
    """
    x4t, p1src, p1win, win, winv, g1t, w1a, w1b, m2 = tb
    f32 = np.float32
    xpad = abuf(400 + 32, -1.0)
    x4 = abuf(16 * 32, 0.0)
    P1 = abuf(25 * 64, 0.0)
    h1 = abuf(768, 0.0)
    d1 = abuf(768, 0.0)
    h1t = abuf(144 * H1TS + 16, -1.0)
    h2 = abuf(192, 0.0)
    d2 = abuf(192, 0.0)
    km = abuf(192, 0.0)
    z3 = abuf(32, 0.0)
    h3 = abuf(32, 0.0)
    d3 = abuf(32, 0.0)
    z4 = abuf(16, 0.0)
    y = abuf(16, 0.0)
    d4 = abuf(16, 0.0)
    g4 = abuf(16, 0.0)
    dh2 = abuf(192, 0.0)
    dz2 = abuf(192, 0.0)
    dz1 = abuf(768 + 64, 0.0)     # 64 zeros past the end feed dW1's pad lanes
    kc = abuf(8, 0.0)
    cw = solo_workspace()
    s3c, h2q = cw[1], cw[2]                     # sdlm: s3 and h2^2 from the curvature pass
    hn = abuf(NSOLO if opt == 5 else 16, 0.0)   # opt 5: this example's estimate (W3's stays 0)
    m1 = vsplat(f32(-1.0))
    zero = vzero()
    has_shift = shifts.shape[0] > 0
    has_keep = keep.shape[0] > 0
    has_maps = maps.shape[0] > 0
    has_dc = dcm.shape[0] > 0
    has_soft = soft.shape[0] > 0
    mx = ftz_on()
    t0 = 0
    for n in range(X.shape[0]):
        step[0] += 1
        step_constants(kc, lrs[n], opt, step[0], wd, b1, b2, eps, mu, gamma)
        if PROF:
            t0 = rdtsc()
        # ---- input: xs[i, j] = x[i-dy, j-dx], -1 outside; xpad = xs with a 2-pixel -1 border
        dy, dx = 0, 0
        if has_shift:
            dy, dx = int(shifts[n, 0]), int(shifts[n, 1])
            for i in range(25):
                vstore(xpad, 16 * i, m1)
        for i in range(16):
            r = i + dy
            if 0 <= r < 16:
                vstore(xpad, (r + 2) * 20 + 2 + dx, vload(X, n * 256 + i * 16))
                xpad[(r + 2) * 20 + 1] = -1.0
                xpad[(r + 2) * 20 + 18] = -1.0
        for i in range(32):
            vstore(x4, 16 * i, vgather(xpad, x4t, 16 * i))
        for j in range(100):
            blk, off = p1src[2 * j], p1src[2 * j + 1]
            vstore(P1, 16 * j, vperm2(vload(x4, blk * 32), p1win, off * 16, vload(x4, blk * 32 + 16)))
        if PROF:
            t0 = _tick(prof, n * 8 + 0, t0)
        # ---- H1: two output planes at a time, 8 accumulators of 16 positions
        for c in range(0, 12, 2):
            a0 = vload(P, OB1 + c * 64)
            a1 = vload(P, OB1 + c * 64 + 16)
            a2 = vload(P, OB1 + c * 64 + 32)
            a3 = vload(P, OB1 + c * 64 + 48)
            e0 = vload(P, OB1 + c * 64 + 64)
            e1 = vload(P, OB1 + c * 64 + 80)
            e2 = vload(P, OB1 + c * 64 + 96)
            e3 = vload(P, OB1 + c * 64 + 112)
            for k in range(25):
                wa = vsplat(P[OW1 + c * 25 + k])
                we = vsplat(P[OW1 + c * 25 + 25 + k])
                p = vload(P1, k * 64)
                a0 = vfma(wa, p, a0)
                e0 = vfma(we, p, e0)
                p = vload(P1, k * 64 + 16)
                a1 = vfma(wa, p, a1)
                e1 = vfma(we, p, e1)
                p = vload(P1, k * 64 + 32)
                a2 = vfma(wa, p, a2)
                e2 = vfma(we, p, e2)
                p = vload(P1, k * 64 + 48)
                a3 = vfma(wa, p, a3)
                e3 = vfma(we, p, e3)
            vstore(h1, c * 64, a0)                     # pre-activations; activated below
            vstore(h1, c * 64 + 16, a1)
            vstore(h1, c * 64 + 32, a2)
            vstore(h1, c * 64 + 48, a3)
            vstore(h1, c * 64 + 64, e0)
            vstore(h1, c * 64 + 80, e1)
            vstore(h1, c * 64 + 96, e2)
            vstore(h1, c * 64 + 112, e3)
        # a flat loop of independent vectors: their tanh latency chains overlap
        for j in range(0, 768, 16):
            h, d = act_fwd(vload(h1, j), act)
            vstore(h1, j, h)
            vstore(d1, j, d)
        if has_maps:   # spatial dropout: a whole plane (4 phase vectors) times its factor
            for c in range(12):
                f = vsplat(maps[n, c])
                for j in range(c * 64, c * 64 + 64, 16):
                    vstore(h1, j, vmul(vload(h1, j), f))
                    vstore(d1, j, vmul(vload(d1, j), f))
        if PROF:
            t0 = _tick(prof, n * 8 + 1, t0)
        # ---- H2: 12 accumulators (3 groups x 4 planes). Planes 0-3 feed groups 0 and 2,
        # 4-7 groups 0 and 1, 8-11 groups 1 and 2: each range's loop updates 8 of them.
        o0, o1, o2, o3 = vload(P, OB2), vload(P, OB2 + 16), vload(P, OB2 + 32), vload(P, OB2 + 48)
        o4, o5, o6, o7 = vload(P, OB2 + 64), vload(P, OB2 + 80), vload(P, OB2 + 96), vload(P, OB2 + 112)
        o8, o9, o10, o11 = vload(P, OB2 + 128), vload(P, OB2 + 144), vload(P, OB2 + 160), vload(P, OB2 + 176)
        for i in range(4):
            for ky in range(5):
                for kx in range(5):
                    p = vperm2(vload(h1, i * 64 + ((ky & 1) * 2 + (kx & 1)) * 16), win,
                               ((ky >> 1) * 3 + (kx >> 1)) * 16, m1)
                    w = OW2 + ky * W2R + kx * 12 + i
                    o0 = vfma(vsplat(P[w]), p, o0)
                    o1 = vfma(vsplat(P[w + W2O]), p, o1)
                    o2 = vfma(vsplat(P[w + 2 * W2O]), p, o2)
                    o3 = vfma(vsplat(P[w + 3 * W2O]), p, o3)
                    o8 = vfma(vsplat(P[w + 8 * W2O]), p, o8)
                    o9 = vfma(vsplat(P[w + 9 * W2O]), p, o9)
                    o10 = vfma(vsplat(P[w + 10 * W2O]), p, o10)
                    o11 = vfma(vsplat(P[w + 11 * W2O]), p, o11)
        for i in range(4, 8):
            for ky in range(5):
                for kx in range(5):
                    p = vperm2(vload(h1, i * 64 + ((ky & 1) * 2 + (kx & 1)) * 16), win,
                               ((ky >> 1) * 3 + (kx >> 1)) * 16, m1)
                    w = OW2 + ky * W2R + kx * 12 + i
                    o0 = vfma(vsplat(P[w]), p, o0)
                    o1 = vfma(vsplat(P[w + W2O]), p, o1)
                    o2 = vfma(vsplat(P[w + 2 * W2O]), p, o2)
                    o3 = vfma(vsplat(P[w + 3 * W2O]), p, o3)
                    o4 = vfma(vsplat(P[w + 4 * W2O]), p, o4)
                    o5 = vfma(vsplat(P[w + 5 * W2O]), p, o5)
                    o6 = vfma(vsplat(P[w + 6 * W2O]), p, o6)
                    o7 = vfma(vsplat(P[w + 7 * W2O]), p, o7)
        for i in range(8, 12):
            for ky in range(5):
                for kx in range(5):
                    p = vperm2(vload(h1, i * 64 + ((ky & 1) * 2 + (kx & 1)) * 16), win,
                               ((ky >> 1) * 3 + (kx >> 1)) * 16, m1)
                    w = OW2 + ky * W2R + kx * 12 + i
                    o4 = vfma(vsplat(P[w + 4 * W2O]), p, o4)
                    o5 = vfma(vsplat(P[w + 5 * W2O]), p, o5)
                    o6 = vfma(vsplat(P[w + 6 * W2O]), p, o6)
                    o7 = vfma(vsplat(P[w + 7 * W2O]), p, o7)
                    o8 = vfma(vsplat(P[w + 8 * W2O]), p, o8)
                    o9 = vfma(vsplat(P[w + 9 * W2O]), p, o9)
                    o10 = vfma(vsplat(P[w + 10 * W2O]), p, o10)
                    o11 = vfma(vsplat(P[w + 11 * W2O]), p, o11)
        vstore(h2, 0, o0)
        vstore(h2, 16, o1)
        vstore(h2, 32, o2)
        vstore(h2, 48, o3)
        vstore(h2, 64, o4)
        vstore(h2, 80, o5)
        vstore(h2, 96, o6)
        vstore(h2, 112, o7)
        vstore(h2, 128, o8)
        vstore(h2, 144, o9)
        vstore(h2, 160, o10)
        vstore(h2, 176, o11)
        for o in range(12):
            h, d = act_fwd(vload(h2, o * 16), act)
            if has_keep:
                for l in range(16):
                    km[o * 16 + l] = scale if keep[n, o * 16 + l] else F0
                h = vmul(h, vload(km, o * 16))
            vstore(h2, o * 16, h)
            vstore(d2, o * 16, d)
        if PROF:
            t0 = _tick(prof, n * 8 + 2, t0)
        # ---- H3: per unit, lane partials over the 12 planes, then the lane tree
        dn = n * 5760
        for m in range(30):
            if has_dc:   # DropConnect: this example's masked weights w3 * factor
                acc = vmul(vmul(vload(P, OW3 + m * 192), vload(dcm, dn + m * 192)), vload(h2, 0))
                for o in range(1, 12):
                    acc = vfma(vmul(vload(P, OW3 + m * 192 + o * 16), vload(dcm, dn + m * 192 + o * 16)),
                               vload(h2, o * 16), acc)
            else:
                acc = vmul(vload(P, OW3 + m * 192), vload(h2, 0))
                for o in range(1, 12):
                    acc = vfma(vload(P, OW3 + m * 192 + o * 16), vload(h2, o * 16), acc)
            z3[m] = vhsum(acc) + P[OB3 + m]
        for j in range(2):
            h, d = act_fwd(vload(z3, 16 * j), act)
            vstore(h3, 16 * j, h)
            vstore(d3, 16 * j, d)
        # ---- output and the loss gradient
        h3a = vload(h3, 0)
        h3b = vload(h3, 16)
        for q in range(10):
            acc = vfma(vload(P, OW4 + q * 32 + 16), h3b, vmul(vload(P, OW4 + q * 32), h3a))
            z4[q] = vhsum(acc) + P[OB4 + q]
        yv, dv = out_fwd(vload(z4, 0), out_act)
        vstore(y, 0, yv)
        vstore(d4, 0, dv)
        loss_grad(y, d4, 0, 1, labels[n], loss, smooth, g4)
        if has_soft:
            _soft_grad(y, d4, soft, n, units, lam, temp, g4)
        if opt == 3:
            solo_curvature(V, P, P1, h1, d1, h2, d2, km, h3, d3, y, d4, has_keep, loss, tb, cw)
        elif opt == 5:                                   # V += the estimate, all but W3's (below)
            solo_curvature(hn, P, P1, h1, d1, h2, d2, km, h3, d3, y, d4, has_keep, loss, tb, cw)
            for j in range(0, OW3, 16):
                vstore(V, j, vadd(vload(V, j), vload(hn, j)))
            for j in range(OB3, NSOLO, 16):
                vstore(V, j, vadd(vload(V, j), vload(hn, j)))
        if PROF:
            t0 = _tick(prof, n * 8 + 3, t0)
        # ---- backward: output layer (dh3 summed over q in order)
        for q in range(10):
            dq = vsplat(g4[q])
            wa = vload(P, OW4 + q * 32)
            wb = vload(P, OW4 + q * 32 + 16)
            if q == 0:
                ha = vmul(wa, dq)
                hb = vmul(wb, dq)
            else:
                ha = vfma(wa, dq, ha)
                hb = vfma(wb, dq, hb)
            vstep(P, M, V, OW4 + q * 32, vmul(dq, h3a), kc, opt)
            vstep(P, M, V, OW4 + q * 32 + 16, vmul(dq, h3b), kc, opt)
        vstep(P, M, V, OB4, vload(g4, 0), kc, opt)
        vstore(d3, 0, vmul(ha, vload(d3, 0)))          # d3 <- dz3
        vstore(d3, 16, vmul(hb, vload(d3, 16)))
        # ---- H3: dh2 summed over m in order, 6 vectors at a time in registers
        for o0 in range(0, 12, 6):
            for m in range(30):
                dm = vsplat(d3[m])
                w = OW3 + m * 192 + o0 * 16
                w0, w1, w2 = vload(P, w), vload(P, w + 16), vload(P, w + 32)
                w3, w4, w5 = vload(P, w + 48), vload(P, w + 64), vload(P, w + 80)
                if has_dc:
                    dk = dn + m * 192 + o0 * 16
                    w0, w1, w2 = vmul(w0, vload(dcm, dk)), vmul(w1, vload(dcm, dk + 16)), vmul(w2, vload(dcm, dk + 32))
                    w3, w4 = vmul(w3, vload(dcm, dk + 48)), vmul(w4, vload(dcm, dk + 64))
                    w5 = vmul(w5, vload(dcm, dk + 80))
                if m == 0:
                    c0, c1, c2, c3, c4, c5 = vmul(w0, dm), vmul(w1, dm), vmul(w2, dm), vmul(w3, dm), vmul(w4, dm), vmul(w5, dm)
                else:
                    c0, c1, c2 = vfma(w0, dm, c0), vfma(w1, dm, c1), vfma(w2, dm, c2)
                    c3, c4, c5 = vfma(w3, dm, c3), vfma(w4, dm, c4), vfma(w5, dm, c5)
                for j in range(6):
                    g = vmul(dm, vload(h2, (o0 + j) * 16))
                    if has_dc:
                        g = vmul(g, vload(dcm, dn + m * 192 + (o0 + j) * 16))
                    if opt == 3:                                # sdlm: W3's estimate s3[m] h2^2 here
                        vstep_h(P, M, w + 16 * j, g, vmul(vsplat(s3c[m]), vload(h2q, (o0 + j) * 16)), kc)
                    else:
                        vstep(P, M, V, w + 16 * j, g, kc, opt)
                        if opt == 5:                            # and added to V's sum here
                            e = w + 16 * j
                            vstore(V, e, vadd(vload(V, e), vmul(vsplat(s3c[m]), vload(h2q, (o0 + j) * 16))))
            for j, c in enumerate((c0, c1, c2, c3, c4, c5)):
                vstore(dh2, (o0 + j) * 16, c)
        vstep(P, M, V, OB3, vload(d3, 0), kc, opt)
        vstep(P, M, V, OB3 + 16, vload(d3, 16), kc, opt)
        for o in range(12):
            g = vload(dh2, o * 16)
            if has_keep:
                g = vmul(g, vload(km, o * 16))
            g = vmul(g, vload(d2, o * 16))
            vstore(dz2, o * 16, g)
            vstep(P, M, V, OB2 + o * 16, g, kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 4, t0)
        # ---- H2 -> H1: per plane and phase, the adjoint windows of the two groups' sums
        for i in range(12):
            ga = 0 if i < 8 else 1                  # the two groups that read plane i
            gb = 1 if 4 <= i < 8 else 2
            da0, da1 = vload(dz2, 64 * ga), vload(dz2, 64 * ga + 16)
            da2, da3 = vload(dz2, 64 * ga + 32), vload(dz2, 64 * ga + 48)
            db0, db1 = vload(dz2, 64 * gb), vload(dz2, 64 * gb + 16)
            db2, db3 = vload(dz2, 64 * gb + 32), vload(dz2, 64 * gb + 48)
            for a in range(2):
                for b in range(2):
                    acc = zero
                    for sy in range(3 - a):
                        for sx in range(3 - b):
                            ky, kx = 2 * sy + a, 2 * sx + b
                            wa = OW2 + 4 * ga * W2O + ky * W2R + kx * 12 + i
                            wb = OW2 + 4 * gb * W2O + ky * W2R + kx * 12 + i
                            t = vmul(vsplat(P[wa]), da0)
                            t = vfma(vsplat(P[wa + W2O]), da1, t)
                            t = vfma(vsplat(P[wa + 2 * W2O]), da2, t)
                            t = vfma(vsplat(P[wa + 3 * W2O]), da3, t)
                            acc = vadd(acc, vperm2(t, winv, (sy * 3 + sx) * 16, zero))
                            t = vmul(vsplat(P[wb]), db0)
                            t = vfma(vsplat(P[wb + W2O]), db1, t)
                            t = vfma(vsplat(P[wb + 2 * W2O]), db2, t)
                            t = vfma(vsplat(P[wb + 3 * W2O]), db3, t)
                            acc = vadd(acc, vperm2(t, winv, (sy * 3 + sx) * 16, zero))
                    j = i * 64 + (2 * a + b) * 16
                    g = vmul(acc, vload(d1, j))
                    vstore(dz1, j, g)
                    vstep(P, M, V, OB1 + j, g, kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 5, t0)
        # ---- H1T: each padded H1 position's 12 planes side by side (the border stays -1)
        for pos in range(64):
            vstore_mask(h1t, ((pos // 8 + 2) * 12 + pos % 8 + 2) * H1TS, vgather(h1, g1t, 16 * pos), 0x0FFF)
        # ---- dW2[o, ky] (lanes kx*12 + plane) = sum over H2 positions in order of dz2[o] * H1T run;
        # per (group, ky): 16 accumulators (4 planes x 4 vectors), each H1T load feeds 4 of them
        for g in range(3):
            for ky in range(5):
                for q in range(16):
                    r = ((2 * (q // 4) + ky) * 12 + 2 * (q % 4)) * H1TS
                    t0v, t1v, t2v, t3v = vload(h1t, r), vload(h1t, r + 16), vload(h1t, r + 32), vload(h1t, r + 48)
                    da = vsplat(dz2[64 * g + q])
                    db = vsplat(dz2[64 * g + 16 + q])
                    dc = vsplat(dz2[64 * g + 32 + q])
                    dd = vsplat(dz2[64 * g + 48 + q])
                    if q == 0:
                        c0, c1, c2, c3 = vmul(da, t0v), vmul(da, t1v), vmul(da, t2v), vmul(da, t3v)
                        c4, c5, c6, c7 = vmul(db, t0v), vmul(db, t1v), vmul(db, t2v), vmul(db, t3v)
                        c8, c9, c10, c11 = vmul(dc, t0v), vmul(dc, t1v), vmul(dc, t2v), vmul(dc, t3v)
                        c12, c13, c14, c15 = vmul(dd, t0v), vmul(dd, t1v), vmul(dd, t2v), vmul(dd, t3v)
                    else:
                        c0, c1, c2, c3 = vfma(da, t0v, c0), vfma(da, t1v, c1), vfma(da, t2v, c2), vfma(da, t3v, c3)
                        c4, c5, c6, c7 = vfma(db, t0v, c4), vfma(db, t1v, c5), vfma(db, t2v, c6), vfma(db, t3v, c7)
                        c8, c9, c10, c11 = vfma(dc, t0v, c8), vfma(dc, t1v, c9), vfma(dc, t2v, c10), vfma(dc, t3v, c11)
                        c12, c13, c14, c15 = vfma(dd, t0v, c12), vfma(dd, t1v, c13), vfma(dd, t2v, c14), vfma(dd, t3v, c15)
                mk0, mk1 = vload(m2, g * W2R), vload(m2, g * W2R + 16)
                mk2, mk3 = vload(m2, g * W2R + 32), vload(m2, g * W2R + 48)
                w = OW2 + 4 * g * W2O + ky * W2R
                vstep(P, M, V, w, vmul(c0, mk0), kc, opt)
                vstep(P, M, V, w + 16, vmul(c1, mk1), kc, opt)
                vstep(P, M, V, w + 32, vmul(c2, mk2), kc, opt)
                vstep(P, M, V, w + 48, vmul(c3, mk3), kc, opt)
                vstep(P, M, V, w + W2O, vmul(c4, mk0), kc, opt)
                vstep(P, M, V, w + W2O + 16, vmul(c5, mk1), kc, opt)
                vstep(P, M, V, w + W2O + 32, vmul(c6, mk2), kc, opt)
                vstep(P, M, V, w + W2O + 48, vmul(c7, mk3), kc, opt)
                vstep(P, M, V, w + 2 * W2O, vmul(c8, mk0), kc, opt)
                vstep(P, M, V, w + 2 * W2O + 16, vmul(c9, mk1), kc, opt)
                vstep(P, M, V, w + 2 * W2O + 32, vmul(c10, mk2), kc, opt)
                vstep(P, M, V, w + 2 * W2O + 48, vmul(c11, mk3), kc, opt)
                vstep(P, M, V, w + 3 * W2O, vmul(c12, mk0), kc, opt)
                vstep(P, M, V, w + 3 * W2O + 16, vmul(c13, mk1), kc, opt)
                vstep(P, M, V, w + 3 * W2O + 32, vmul(c14, mk2), kc, opt)
                vstep(P, M, V, w + 3 * W2O + 48, vmul(c15, mk3), kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 6, t0)
        # ---- dW1[c, k] = tree over lanes of sum over phases of dz1[c, ph] * P1[k, ph]; 16 at a time
        for bt in range(19):
            e = 16 * bt
            g = vtree16(vmac4(dz1, w1a[e], P1, w1b[e]), vmac4(dz1, w1a[e + 1], P1, w1b[e + 1]),
                        vmac4(dz1, w1a[e + 2], P1, w1b[e + 2]), vmac4(dz1, w1a[e + 3], P1, w1b[e + 3]),
                        vmac4(dz1, w1a[e + 4], P1, w1b[e + 4]), vmac4(dz1, w1a[e + 5], P1, w1b[e + 5]),
                        vmac4(dz1, w1a[e + 6], P1, w1b[e + 6]), vmac4(dz1, w1a[e + 7], P1, w1b[e + 7]),
                        vmac4(dz1, w1a[e + 8], P1, w1b[e + 8]), vmac4(dz1, w1a[e + 9], P1, w1b[e + 9]),
                        vmac4(dz1, w1a[e + 10], P1, w1b[e + 10]), vmac4(dz1, w1a[e + 11], P1, w1b[e + 11]),
                        vmac4(dz1, w1a[e + 12], P1, w1b[e + 12]), vmac4(dz1, w1a[e + 13], P1, w1b[e + 13]),
                        vmac4(dz1, w1a[e + 14], P1, w1b[e + 14]), vmac4(dz1, w1a[e + 15], P1, w1b[e + 15]))
            vstep(P, M, V, OW1 + e, g, kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 7, t0)
    mxcsr_set(mx)


@njit(inline="always")
def _soft_grad(y, dout, soft, n, units, lam, temp, g):
    """g[q] += dL/dz_q of the distillation term L = lam T^2 KL(p || q), q = softmax(y[u] / T) over
    the units u (units[q] = 1), p = soft[n] (T = temp): lam T (q - p) on u, times dout = dy/dz, 0
    elsewhere; one example's share, the engine's 1/B makes it the batch mean's. The softmax as
    loss_grad's: the largest output on u subtracted first, every value rounded to float32."""
    f32 = np.float32
    inv_t = F1 / f32(temp)
    mx = f32(-np.inf)
    for q in range(10):
        if units[q] > F0:
            mx = max(mx, y[q])
    s = F0
    for q in range(10):
        if units[q] > F0:
            s += f32(math.exp((y[q] - mx) * inv_t))
    ls = f32(math.log(s))
    c = f32(lam) * f32(temp)
    for q in range(10):
        if units[q] > F0:
            p = f32(math.exp((y[q] - mx) * inv_t - ls))
            g[q] += (c * (p - soft[n, q])) * dout[q]


@njit(inline="always")
def _tick(prof, j, t0):
    t = rdtsc()
    prof[j] = t - t0
    return t


@njit(cache=True)
def _to_solo(W, r, src, P, M):
    """Replica r's weights in the solo kernel's layout: P[i] = W[r, src[i] - 1], 0 where src[i]
    is 0 (the layout's padding); M, the kernel's gradient sum, zeroed. One pass in numba: two
    np.take calls and a fill cost about twice as much a step at R = 8."""
    for i in range(src.shape[0]):
        j = src[i]
        P[i] = W[r, j - 1] if j > 0 else np.float32(0.0)
        M[i] = np.float32(0.0)


@njit(cache=True)
def _from_solo(M, inv, G, r, scale):
    """G[r, j] = M[inv[j]] * scale: the solo layout's gradient sum back in torch's order, as a mean."""
    for j in range(inv.shape[0]):
        G[r, j] = M[inv[j]] * scale


@njit(cache=True)
def solo_grads(rows, Wn, src, inv, X, lab, zeros, shifts, keep, maps, dcm, soft, scale, P, M, V, step,
                act, out_act, loss, opt, wd, b1, b2, eps, mu, gamma, smooth, tb, prof, units, lam, temp,
                inv_b, G, H):
    """The solo kernel over the replicas in rows, one call: each replica's weights gathered into
    the solo layout (P), its batch run with opt 'accumulate' (V may be M: unused) or
    'accumulate_gn' (V, zeroed per replica, the curvature sums, then H), the sums scattered back in torch's order as batch means (G). Every
    per-replica input has a leading replica axis: X (R, B, 16, 16) or (1, B, 16, 16) shared;
    shifts (R, B, 2), keep (R, B, 192), maps (R, B, 12), dcm (R, B, 5760), soft (R, B, 10), each
    with B = 0 when absent. One call a step instead of R calls with their Python around them
    (slices, contiguous copies, argument checks): ~2% of a kernel-path step at R = 8."""
    curv = H.shape[0] > 0
    for r in rows:
        _to_solo(Wn, r, src, P, M)
        if curv:
            V[:] = np.float32(0.0)
        xr = X[r] if X.shape[0] > 1 else X[0]
        solo_pass(xr, lab, zeros, shifts[r], keep[r], maps[r], dcm[r], scale, P, M, V, step,
                  act, out_act, loss, opt, wd, b1, b2, eps, mu, gamma, smooth, tb, prof, soft[r], units, lam, temp)
        _from_solo(M, inv, G, r, inv_b)
        if curv:
            _from_solo(V, inv, H, r, inv_b)
