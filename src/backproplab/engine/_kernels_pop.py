"""The population kernel: 16 replicas of Net1989 at once, one replica per vector lane.

Every scalar of the net becomes a 16-lane vector (arrays shaped [..., 16]), so there are
no cross-lane operations at all. For each replica the kernel performs the solo kernel's
roundings in the solo kernel's order (see _kernels_solo.py), so lane r ends bit-identical
to a solo run of replica r:
  H1, H2   bias first, then taps (and H2's planes in increasing order) by fused multiply-adds
  H3, out  16 lane partials (solo's lanes = H2 positions), the halving tree, then the bias
  dh3, dh2 sums over q, m in order; dh1 per H1 unit over its windows in the solo order
           (H2 positions in decreasing order), group a then group b
  dW2      sums over H2 positions in order; dW1: 16 partials over the 4 phases, the tree
Register blocking keeps 8-16 accumulators per loop so the fused multiply-adds, not the
loads, set the pace. Measured here: ~115 us a block step, ~7 us per replica (the solo
kernel: ~8 us). Why not less: a replica's step is ~181k multiply-adds, ~1000 tanh and
~9760 parameter steps in either kernel; at 2 fused 16-lane multiply-adds a cycle that is
~6k cycles per replica, plus ~2.5k for the tanh and the steps, against the solo kernel's
~15k; and a block's parameters (625 KB) and activations live in L2, not L1.
"""
import numpy as np
from numba import njit

from ..models.net1989 import PARAM_NAMES
from ._kernels_common import abuf, act_fwd, loss_grad, out_fwd, step_constants, tree16, vstep, vstep_h
from ._kernels_sdlm import pop_curvature, pop_workspace
from ._kernels_solo import PROF, _tick
from ._layout import L, POP_OFFSETS
from ._simd import ftz_on, mxcsr_set, rdtsc, vadd, vfma, vload, vmul, vsplat, vstore, vzero

F0, F1 = np.float32(0.0), np.float32(1.0)
Q1W, Q1B, Q2W, Q2B, Q3W, Q3B, Q4W, Q4B = (POP_OFFSETS[n] for n in PARAM_NAMES)
HP = 144 * L                                    # floats per padded H1 plane (12x12)


@njit(inline="always")
def XP(y, x):
    """Offset of padded-input element (y, x) (20x20, lanes innermost)."""
    return (y * 20 + x) * L


@njit(cache=not PROF)
def pop_pass(X, labels, lrs, shifts, keep, scale, P, M, V, step,
             act, out_act, loss, opt, wd, b1, b2, eps, mu, gamma, smooth, table, h1pos, prof):
    """Train one block of 16 replicas on X[n], n in order (all lanes see the same examples).

    P, M, V: flat (POP_OFFSETS['total'],) parameters and AdamW moments of the block, lane
    r = replica r (opt=2: M receives the gradient, nothing is stepped; opt=3: M the running
    curvature, V this example's estimate, see _kernels_sdlm.py). shifts (16, N, 2) int8 or (0, N, 2); keep (16, N, 192) bool
    or (0, N, 192). table: H2_TABLE (12, 8) int64; h1pos: the solo H1 position order (64,).
    smooth: label smoothing of the cross-entropy's target (0: none).
    prof: int64 (8 N,), cycles per phase and step when PROF is set.
    """
    f32 = np.float32
    xpad = abuf(400 * L + L, -1.0)
    h1p = abuf(12 * HP, -1.0)
    d1 = abuf(768 * L, 0.0)
    h2 = abuf(192 * L, 0.0)
    d2 = abuf(192 * L, 0.0)
    km = abuf(192 * L, 0.0)
    part = abuf(16 * L, 0.0)
    part25 = abuf(25 * 16 * L, 0.0)
    h3 = abuf(30 * L, 0.0)
    d3 = abuf(30 * L, 0.0)
    y = abuf(10 * L, 0.0)
    d4 = abuf(10 * L, 0.0)
    g4 = abuf(10 * L, 0.0)
    dh2 = abuf(192 * L, 0.0)
    dz1 = abuf(768 * L, 0.0)
    kc = abuf(8, 0.0)
    cw = pop_workspace()
    s3c, h2q = cw[1], cw[2]                     # sdlm: s3 and h2^2 from the curvature pass
    m1 = vsplat(f32(-1.0))
    zero = vzero()
    has_shift = shifts.shape[0] > 0
    has_keep = keep.shape[0] > 0
    mx = ftz_on()
    t0 = 0
    for n in range(X.shape[0]):
        step[0] += 1
        step_constants(kc, lrs[n], opt, step[0], wd, b1, b2, eps, mu, gamma)
        if PROF:
            t0 = rdtsc()
        # ---- input
        if has_shift:
            for i in range(400):
                vstore(xpad, i * L, m1)
            for r in range(L):
                dy, dx = int(shifts[r, n, 0]), int(shifts[r, n, 1])
                for i in range(16):
                    for j in range(16):
                        if 0 <= i + dy < 16 and 0 <= j + dx < 16:
                            xpad[XP(i + dy + 2, j + dx + 2) + r] = X[n, i, j]
        else:
            for i in range(16):
                for j in range(16):
                    vstore(xpad, XP(i + 2, j + 2), vsplat(X[n, i, j]))
        if PROF:
            t0 = _tick(prof, n * 8 + 0, t0)
        # ---- H1: planes c, c+1 x one row of 8 positions = 16 accumulators
        for c in range(0, 12, 2):
            for oy in range(8):
                bo = Q1B + (c * 64 + oy * 8) * L
                a0, a1, a2, a3 = vload(P, bo), vload(P, bo + L), vload(P, bo + 2 * L), vload(P, bo + 3 * L)
                a4, a5, a6, a7 = vload(P, bo + 4 * L), vload(P, bo + 5 * L), vload(P, bo + 6 * L), vload(P, bo + 7 * L)
                bo += 64 * L
                e0, e1, e2, e3 = vload(P, bo), vload(P, bo + L), vload(P, bo + 2 * L), vload(P, bo + 3 * L)
                e4, e5, e6, e7 = vload(P, bo + 4 * L), vload(P, bo + 5 * L), vload(P, bo + 6 * L), vload(P, bo + 7 * L)
                for ky in range(5):
                    for kx in range(5):
                        wa = vload(P, Q1W + (c * 25 + ky * 5 + kx) * L)
                        we = vload(P, Q1W + (c * 25 + 25 + ky * 5 + kx) * L)
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
                ro = c * HP + ((oy + 2) * 12 + 2) * L            # pre-activations, in place
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
        # activations as a flat loop of independent vectors (their latency chains overlap;
        # applied per accumulator inside the loop above they ran ~2x slower)
        for c in range(12):
            for oy in range(8):
                for ox in range(8):
                    e = c * HP + ((oy + 2) * 12 + ox + 2) * L
                    h, d = act_fwd(vload(h1p, e), act)
                    vstore(h1p, e, h)
                    vstore(d1, (c * 64 + oy * 8 + ox) * L, d)
        if PROF:
            t0 = _tick(prof, n * 8 + 1, t0)
        # ---- H2: planes o, o+1 (same inputs) x 8 positions (two rows) = 16 accumulators
        for o in range(0, 12, 2):
            for pb in range(2):
                bo = Q2B + (o * 16 + pb * 8) * L
                a0, a1, a2, a3 = vload(P, bo), vload(P, bo + L), vload(P, bo + 2 * L), vload(P, bo + 3 * L)
                a4, a5, a6, a7 = vload(P, bo + 4 * L), vload(P, bo + 5 * L), vload(P, bo + 6 * L), vload(P, bo + 7 * L)
                bo += 16 * L
                e0, e1, e2, e3 = vload(P, bo), vload(P, bo + L), vload(P, bo + 2 * L), vload(P, bo + 3 * L)
                e4, e5, e6, e7 = vload(P, bo + 4 * L), vload(P, bo + 5 * L), vload(P, bo + 6 * L), vload(P, bo + 7 * L)
                for j in range(8):
                    pl = table[o, j] * HP
                    for ky in range(5):
                        for kx in range(5):
                            wa = vload(P, Q2W + (o * 200 + j * 25 + ky * 5 + kx) * L)
                            we = vload(P, Q2W + (o * 200 + 200 + j * 25 + ky * 5 + kx) * L)
                            xb = pl + ((4 * pb + ky) * 12 + kx) * L
                            x = vload(h1p, xb)
                            a0, e0 = vfma(wa, x, a0), vfma(we, x, e0)
                            x = vload(h1p, xb + 2 * L)
                            a1, e1 = vfma(wa, x, a1), vfma(we, x, e1)
                            x = vload(h1p, xb + 4 * L)
                            a2, e2 = vfma(wa, x, a2), vfma(we, x, e2)
                            x = vload(h1p, xb + 6 * L)
                            a3, e3 = vfma(wa, x, a3), vfma(we, x, e3)
                            x = vload(h1p, xb + 24 * L)
                            a4, e4 = vfma(wa, x, a4), vfma(we, x, e4)
                            x = vload(h1p, xb + 26 * L)
                            a5, e5 = vfma(wa, x, a5), vfma(we, x, e5)
                            x = vload(h1p, xb + 28 * L)
                            a6, e6 = vfma(wa, x, a6), vfma(we, x, e6)
                            x = vload(h1p, xb + 30 * L)
                            a7, e7 = vfma(wa, x, a7), vfma(we, x, e7)
                u = (o * 16 + pb * 8) * L                         # pre-activations
                vstore(h2, u, a0)
                vstore(h2, u + L, a1)
                vstore(h2, u + 2 * L, a2)
                vstore(h2, u + 3 * L, a3)
                vstore(h2, u + 4 * L, a4)
                vstore(h2, u + 5 * L, a5)
                vstore(h2, u + 6 * L, a6)
                vstore(h2, u + 7 * L, a7)
                u += 16 * L
                vstore(h2, u, e0)
                vstore(h2, u + L, e1)
                vstore(h2, u + 2 * L, e2)
                vstore(h2, u + 3 * L, e3)
                vstore(h2, u + 4 * L, e4)
                vstore(h2, u + 5 * L, e5)
                vstore(h2, u + 6 * L, e6)
                vstore(h2, u + 7 * L, e7)
        for u in range(192):
            h, d = act_fwd(vload(h2, u * L), act)
            if has_keep:
                for r in range(L):
                    km[u * L + r] = scale if keep[r, n, u] else F0
                h = vmul(h, vload(km, u * L))
            vstore(h2, u * L, h)
            vstore(d2, u * L, d)
        if PROF:
            t0 = _tick(prof, n * 8 + 2, t0)
        # ---- H3: 16 lane partials over the 12 H2 planes (solo's lanes), tree, + bias
        for m in range(30):
            for ll in range(16):
                acc = vmul(vload(P, Q3W + (m * 192 + ll) * L), vload(h2, ll * L))
                for o in range(1, 12):
                    acc = vfma(vload(P, Q3W + (m * 192 + o * 16 + ll) * L), vload(h2, (o * 16 + ll) * L), acc)
                vstore(part, ll * L, acc)
            h, d = act_fwd(vadd(tree16(part), vload(P, Q3B + m * L)), act)
            vstore(h3, m * L, h)
            vstore(d3, m * L, d)
        # ---- output: solo's two 16-lane halves (units 30, 31 are zero there)
        for q in range(10):
            for ll in range(16):
                acc = vmul(vload(P, Q4W + (q * 30 + ll) * L), vload(h3, ll * L))
                if ll < 14:
                    acc = vfma(vload(P, Q4W + (q * 30 + 16 + ll) * L), vload(h3, (16 + ll) * L), acc)
                vstore(part, ll * L, acc)
            yv, dv = out_fwd(vadd(tree16(part), vload(P, Q4B + q * L)), out_act)
            vstore(y, q * L, yv)
            vstore(d4, q * L, dv)
        for r in range(L):
            loss_grad(y, d4, r, L, labels[n], loss, smooth, g4)
        if opt == 3:
            pop_curvature(V, P, xpad, h1p, d1, h2, d2, km, h3, d3, y, d4, has_keep, loss, table, h1pos, cw)
        if PROF:
            t0 = _tick(prof, n * 8 + 3, t0)
        # ---- backward: output layer
        for m in range(30):
            acc = zero
            for q in range(10):
                w = vload(P, Q4W + (q * 30 + m) * L)
                gq = vload(g4, q * L)
                acc = vmul(w, gq) if q == 0 else vfma(w, gq, acc)
                vstep(P, M, V, Q4W + (q * 30 + m) * L, vmul(gq, vload(h3, m * L)), kc, opt)
            vstore(d3, m * L, vmul(acc, vload(d3, m * L)))      # d3 <- dz3
        for q in range(10):
            vstep(P, M, V, Q4B + q * L, vload(g4, q * L), kc, opt)
        # ---- H3: dh2 over m in order, 8 units at a time in registers; W3 stepped after its read
        for u0 in range(0, 192, 8):
            for m in range(30):
                dm = vload(d3, m * L)
                w = Q3W + (m * 192 + u0) * L
                w0, w1, w2, w3 = vload(P, w), vload(P, w + L), vload(P, w + 2 * L), vload(P, w + 3 * L)
                w4, w5, w6, w7 = vload(P, w + 4 * L), vload(P, w + 5 * L), vload(P, w + 6 * L), vload(P, w + 7 * L)
                if m == 0:
                    c0, c1, c2, c3 = vmul(w0, dm), vmul(w1, dm), vmul(w2, dm), vmul(w3, dm)
                    c4, c5, c6, c7 = vmul(w4, dm), vmul(w5, dm), vmul(w6, dm), vmul(w7, dm)
                else:
                    c0, c1, c2, c3 = vfma(w0, dm, c0), vfma(w1, dm, c1), vfma(w2, dm, c2), vfma(w3, dm, c3)
                    c4, c5, c6, c7 = vfma(w4, dm, c4), vfma(w5, dm, c5), vfma(w6, dm, c6), vfma(w7, dm, c7)
                for j in range(8):
                    g = vmul(dm, vload(h2, (u0 + j) * L))
                    if opt == 3:                                # sdlm: W3's estimate s3[m] h2^2 here
                        vstep_h(P, M, w + j * L, g, vmul(vload(s3c, m * L), vload(h2q, (u0 + j) * L)), kc)
                    else:
                        vstep(P, M, V, w + j * L, g, kc, opt)
            for j, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7)):
                vstore(dh2, (u0 + j) * L, c)
        for m in range(30):
            vstep(P, M, V, Q3B + m * L, vload(d3, m * L), kc, opt)
        for u in range(192):
            g = vload(dh2, u * L)
            if has_keep:
                g = vmul(g, vload(km, u * L))
            g = vmul(g, vload(d2, u * L))
            vstore(dh2, u * L, g)                               # dh2 <- dz2
            vstep(P, M, V, Q2B + u * L, g, kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 4, t0)
        # ---- H2 -> H1: per plane, H2 positions in decreasing order (= solo's window order)
        for i in range(768):
            vstore(dz1, i * L, zero)
        for i in range(12):
            ga = 0 if i < 8 else 1
            gb = 1 if 4 <= i < 8 else 2
            ja = i if ga == 0 else i - 4                        # slot of plane i in group ga's table
            jb = i - 4 if (gb == 1 or i >= 8) else i
            for q in range(15, -1, -1):
                oy2, ox2 = q // 4, q % 4
                da0, da1 = vload(dh2, (64 * ga + q) * L), vload(dh2, (64 * ga + 16 + q) * L)
                da2, da3 = vload(dh2, (64 * ga + 32 + q) * L), vload(dh2, (64 * ga + 48 + q) * L)
                db0, db1 = vload(dh2, (64 * gb + q) * L), vload(dh2, (64 * gb + 16 + q) * L)
                db2, db3 = vload(dh2, (64 * gb + 32 + q) * L), vload(dh2, (64 * gb + 48 + q) * L)
                # taps whose H1 unit (2 oy2 + ky - 2, 2 ox2 + kx - 2) is inside the plane
                for ky in range(max(0, 2 - 2 * oy2), min(5, 10 - 2 * oy2)):
                    for kx in range(max(0, 2 - 2 * ox2), min(5, 10 - 2 * ox2)):
                        wa = Q2W + ((4 * ga) * 200 + ja * 25 + ky * 5 + kx) * L
                        wb = Q2W + ((4 * gb) * 200 + jb * 25 + ky * 5 + kx) * L
                        t = vmul(vload(P, wa), da0)
                        t = vfma(vload(P, wa + 200 * L), da1, t)
                        t = vfma(vload(P, wa + 400 * L), da2, t)
                        t = vfma(vload(P, wa + 600 * L), da3, t)
                        t2 = vmul(vload(P, wb), db0)
                        t2 = vfma(vload(P, wb + 200 * L), db1, t2)
                        t2 = vfma(vload(P, wb + 400 * L), db2, t2)
                        t2 = vfma(vload(P, wb + 600 * L), db3, t2)
                        e = (i * 64 + (2 * oy2 + ky - 2) * 8 + 2 * ox2 + kx - 2) * L
                        vstore(dz1, e, vadd(vadd(vload(dz1, e), t), t2))
        for i in range(768):
            g = vmul(vload(dz1, i * L), vload(d1, i * L))
            vstore(dz1, i * L, g)
            vstep(P, M, V, Q1B + i * L, g, kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 5, t0)
        # ---- dW2[o, j, ky, :] for planes o, o+1: 10 accumulators over H2 positions in order.
        # Input plane outermost: its 9 KB stay in L1 for the 4 output pairs that read it
        # (output-pair outermost re-read every plane from L2: ~2x slower)
        for i in range(12):
            ga = 0 if i < 8 else 1
            gb = 1 if 4 <= i < 8 else 2
            for t in range(4):
                g = ga if t < 2 else gb
                j = (i if g == 0 else i - 4) if t < 2 else (i - 4 if (g == 1 or i >= 8) else i)
                o = 4 * g + 2 * (t % 2)
                pl = i * HP
                for ky in range(5):
                    for q in range(16):
                        da = vload(dh2, (o * 16 + q) * L)
                        de = vload(dh2, (o * 16 + 16 + q) * L)
                        xb = pl + ((2 * (q // 4) + ky) * 12 + 2 * (q % 4)) * L
                        x0, x1, x2 = vload(h1p, xb), vload(h1p, xb + L), vload(h1p, xb + 2 * L)
                        x3, x4 = vload(h1p, xb + 3 * L), vload(h1p, xb + 4 * L)
                        if q == 0:
                            c0, c1, c2, c3, c4 = vmul(da, x0), vmul(da, x1), vmul(da, x2), vmul(da, x3), vmul(da, x4)
                            c5, c6, c7, c8, c9 = vmul(de, x0), vmul(de, x1), vmul(de, x2), vmul(de, x3), vmul(de, x4)
                        else:
                            c0, c1, c2 = vfma(da, x0, c0), vfma(da, x1, c1), vfma(da, x2, c2)
                            c3, c4 = vfma(da, x3, c3), vfma(da, x4, c4)
                            c5, c6, c7 = vfma(de, x0, c5), vfma(de, x1, c6), vfma(de, x2, c7)
                            c8, c9 = vfma(de, x3, c8), vfma(de, x4, c9)
                    w = Q2W + (o * 200 + j * 25 + ky * 5) * L
                    vstep(P, M, V, w, c0, kc, opt)
                    vstep(P, M, V, w + L, c1, kc, opt)
                    vstep(P, M, V, w + 2 * L, c2, kc, opt)
                    vstep(P, M, V, w + 3 * L, c3, kc, opt)
                    vstep(P, M, V, w + 4 * L, c4, kc, opt)
                    w += 200 * L
                    vstep(P, M, V, w, c5, kc, opt)
                    vstep(P, M, V, w + L, c6, kc, opt)
                    vstep(P, M, V, w + 2 * L, c7, kc, opt)
                    vstep(P, M, V, w + 3 * L, c8, kc, opt)
                    vstep(P, M, V, w + 4 * L, c9, kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 6, t0)
        # ---- dW1[c, k]: solo's 16 lanes (sum over the 4 phases in order), then the tree
        for c in range(12):
            for ll in range(16):
                p0, p1, p2, p3 = h1pos[ll], h1pos[16 + ll], h1pos[32 + ll], h1pos[48 + ll]
                z0 = vload(dz1, (c * 64 + p0) * L)
                z1 = vload(dz1, (c * 64 + p1) * L)
                z2 = vload(dz1, (c * 64 + p2) * L)
                z3 = vload(dz1, (c * 64 + p3) * L)
                x0 = XP(2 * (p0 // 8), 2 * (p0 % 8))
                x1 = XP(2 * (p1 // 8), 2 * (p1 % 8))
                x2 = XP(2 * (p2 // 8), 2 * (p2 % 8))
                x3 = XP(2 * (p3 // 8), 2 * (p3 % 8))
                for ky in range(5):
                    for kx in range(5):
                        o = XP(ky, kx)
                        acc = vmul(z0, vload(xpad, x0 + o))
                        acc = vfma(z1, vload(xpad, x1 + o), acc)
                        acc = vfma(z2, vload(xpad, x2 + o), acc)
                        acc = vfma(z3, vload(xpad, x3 + o), acc)
                        vstore(part25, ((ky * 5 + kx) * 16 + ll) * L, acc)
            for k in range(25):
                vstep(P, M, V, Q1W + (c * 25 + k) * L, tree16(part25[k * 256:(k + 1) * 256]), kc, opt)
        if PROF:
            t0 = _tick(prof, n * 8 + 7, t0)
    mxcsr_set(mx)
