"""The 1989 optimizer's curvature pass (stochastic diagonal Levenberg-Marquardt) for both kernels.

After the forward pass and before the gradient's backward pass (which steps the weights),
a kernel with opt=3 calls one of these to write this example's positive Gauss-Newton
diagonal estimate of every parameter into Hn (the kernel's layout, zeros where no
parameter); vstep then folds it into the running average and divides the step by it.
W3's estimate, the outer product s3 x h2^2, is not written: the backward pass forms it
where it steps W3 (vstep_h) from s3 and h2^2 left in the workspace. The solo kernel's
opt=5 (the population engine's minibatch sdlm) writes the estimate into a scratch Hn
instead and adds it, and W3's outer product at W3's step site, to a sum over the batch.
The maths is methods/sdlm.py's net1989_gn_diag: second derivatives travel down like
the gradient, with squared weights, squared activation slopes and squared inputs:
  s4 = loss curvature (loss_curv)        s3 = f'(z3)^2 sum_q W4[q]^2 s4[q]
  s2 = f'(z2)^2 keep^2 sum_m W3[m]^2 s3[m]   s1 = f'(z1)^2 (adjoint conv of s2 with W2^2)
  h(W) = sum over the weight's uses of s(output unit) * input^2 ;  h(b) = s
Each sum runs in the order the same kernel's gradient uses for the matching sum, so
replica k of a population still ends bit-identical to a solo run.

Numba's cache keys each kernel on its own source file: after editing this file delete
the _kernels_* cache files in __pycache__ (as for _simd.py).
"""
from numba import njit

from ..models.net1989 import PARAM_NAMES
from ._kernels_common import abuf, loss_curv, tree16
from ._layout import H1TS, L, POP_OFFSETS, SOLO_OFFSETS, W2R
from ._simd import vadd, vfma, vgather, vload, vmac4, vmul, vperm2, vsplat, vstore, vstore_mask, vtree16, vzero

OW1, OB1, OW2, OB2, OW3, OB3, OW4, OB4 = (SOLO_OFFSETS[n] for n in PARAM_NAMES)
Q1W, Q1B, Q2W, Q2B, Q3W, Q3B, Q4W, Q4B = (POP_OFFSETS[n] for n in PARAM_NAMES)
W2O = 5 * W2R
HP = 144 * L


@njit(inline="always")
def vsq(v):
    return vmul(v, v)


@njit
def solo_workspace():
    """s4, s3, h2^2, s2 (sums first), s1 (+64 zeros for dW1's pad lanes), H1T^2 (border 1), P1^2."""
    return (abuf(16, 0.0), abuf(32, 0.0), abuf(192, 0.0), abuf(192, 0.0), abuf(768 + 64, 0.0),
            abuf(144 * H1TS + 16, 1.0), abuf(25 * 64, 0.0))


@njit
def solo_curvature(Hn, P, P1, h1, d1, h2, d2, km, h3, d3, y, d4, has_keep, loss, tb, ws):
    """Hn <- the estimate, solo layout. Activations as the solo kernel leaves them after its
    forward pass (h2 already scaled by the keep mask km; d* the slopes f'(z))."""
    x4t, p1src, p1win, win, winv, g1t, w1a, w1b, m2 = tb
    s4, s3, h2q, s2, s1, h1q, p1q = ws
    zero = vzero()
    # ---- output layer; s3 summed over q in order (the gradient's dh3 order)
    loss_curv(y, d4, 0, 1, loss, s4)
    vstore(Hn, OB4, vload(s4, 0))
    qa, qb = vsq(vload(h3, 0)), vsq(vload(h3, 16))
    for q in range(10):
        sq = vsplat(s4[q])
        wa, wb = vsq(vload(P, OW4 + q * 32)), vsq(vload(P, OW4 + q * 32 + 16))
        if q == 0:
            ha, hb = vmul(wa, sq), vmul(wb, sq)
        else:
            ha, hb = vfma(wa, sq, ha), vfma(wb, sq, hb)
        vstore(Hn, OW4 + q * 32, vmul(sq, qa))
        vstore(Hn, OW4 + q * 32 + 16, vmul(sq, qb))
    vstore(s3, 0, vmul(ha, vsq(vload(d3, 0))))
    vstore(s3, 16, vmul(hb, vsq(vload(d3, 16))))
    vstore(Hn, OB3, vload(s3, 0))
    vstore(Hn, OB3 + 16, vload(s3, 16))
    # ---- H3: sums over m in order, 6 planes at a time
    for o in range(12):
        vstore(h2q, o * 16, vsq(vload(h2, o * 16)))
    for o0 in range(0, 12, 6):
        for m in range(30):
            sm = vsplat(s3[m])
            w = OW3 + m * 192 + o0 * 16
            w0, w1, w2 = vsq(vload(P, w)), vsq(vload(P, w + 16)), vsq(vload(P, w + 32))
            w3, w4, w5 = vsq(vload(P, w + 48)), vsq(vload(P, w + 64)), vsq(vload(P, w + 80))
            if m == 0:
                c0, c1, c2, c3, c4, c5 = vmul(w0, sm), vmul(w1, sm), vmul(w2, sm), vmul(w3, sm), vmul(w4, sm), vmul(w5, sm)
            else:
                c0, c1, c2 = vfma(w0, sm, c0), vfma(w1, sm, c1), vfma(w2, sm, c2)
                c3, c4, c5 = vfma(w3, sm, c3), vfma(w4, sm, c4), vfma(w5, sm, c5)
        for j, c in enumerate((c0, c1, c2, c3, c4, c5)):
            vstore(s2, (o0 + j) * 16, c)
    for o in range(12):
        t = vload(s2, o * 16)
        if has_keep:
            t = vmul(t, vsq(vload(km, o * 16)))
        t = vmul(t, vsq(vload(d2, o * 16)))
        vstore(s2, o * 16, t)
        vstore(Hn, OB2 + o * 16, t)
    # ---- H2 -> H1: the adjoint windows with W2^2 (the gradient's dh1 order)
    for i in range(12):
        ga = 0 if i < 8 else 1
        gb = 1 if 4 <= i < 8 else 2
        sa0, sa1, sa2, sa3 = vload(s2, 64 * ga), vload(s2, 64 * ga + 16), vload(s2, 64 * ga + 32), vload(s2, 64 * ga + 48)
        sb0, sb1, sb2, sb3 = vload(s2, 64 * gb), vload(s2, 64 * gb + 16), vload(s2, 64 * gb + 32), vload(s2, 64 * gb + 48)
        for a in range(2):
            for b in range(2):
                acc = zero
                for sy in range(3 - a):
                    for sx in range(3 - b):
                        ky, kx = 2 * sy + a, 2 * sx + b
                        wa = OW2 + 4 * ga * W2O + ky * W2R + kx * 12 + i
                        wb = OW2 + 4 * gb * W2O + ky * W2R + kx * 12 + i
                        t = vmul(vsq(vsplat(P[wa])), sa0)
                        t = vfma(vsq(vsplat(P[wa + W2O])), sa1, t)
                        t = vfma(vsq(vsplat(P[wa + 2 * W2O])), sa2, t)
                        t = vfma(vsq(vsplat(P[wa + 3 * W2O])), sa3, t)
                        acc = vadd(acc, vperm2(t, winv, (sy * 3 + sx) * 16, zero))
                        t = vmul(vsq(vsplat(P[wb])), sb0)
                        t = vfma(vsq(vsplat(P[wb + W2O])), sb1, t)
                        t = vfma(vsq(vsplat(P[wb + 2 * W2O])), sb2, t)
                        t = vfma(vsq(vsplat(P[wb + 3 * W2O])), sb3, t)
                        acc = vadd(acc, vperm2(t, winv, (sy * 3 + sx) * 16, zero))
                j = i * 64 + (2 * a + b) * 16
                t = vmul(acc, vsq(vload(d1, j)))
                vstore(s1, j, t)
                vstore(Hn, OB1 + j, t)
    # ---- W2: sums over H2 positions in order of s2 * H1T^2 (the -1 border squares to 1)
    for pos in range(64):
        vstore_mask(h1q, ((pos // 8 + 2) * 12 + pos % 8 + 2) * H1TS, vsq(vgather(h1, g1t, 16 * pos)), 0x0FFF)
    for g in range(3):
        for ky in range(5):
            for q in range(16):
                r = ((2 * (q // 4) + ky) * 12 + 2 * (q % 4)) * H1TS
                t0v, t1v, t2v, t3v = vload(h1q, r), vload(h1q, r + 16), vload(h1q, r + 32), vload(h1q, r + 48)
                da, db = vsplat(s2[64 * g + q]), vsplat(s2[64 * g + 16 + q])
                dc, dd = vsplat(s2[64 * g + 32 + q]), vsplat(s2[64 * g + 48 + q])
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
            mk = (vload(m2, g * W2R), vload(m2, g * W2R + 16), vload(m2, g * W2R + 32), vload(m2, g * W2R + 48))
            w = OW2 + 4 * g * W2O + ky * W2R
            for j, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)):
                vstore(Hn, w + (j // 4) * W2O + (j % 4) * 16, vmul(c, mk[j % 4]))
    # ---- W1: lanes summed over phases in order, then vtree16 (the gradient's dW1 order)
    for j in range(100):
        vstore(p1q, 16 * j, vsq(vload(P1, 16 * j)))
    for bt in range(19):
        e = 16 * bt
        vstore(Hn, OW1 + e, vtree16(
            vmac4(s1, w1a[e], p1q, w1b[e]), vmac4(s1, w1a[e + 1], p1q, w1b[e + 1]),
            vmac4(s1, w1a[e + 2], p1q, w1b[e + 2]), vmac4(s1, w1a[e + 3], p1q, w1b[e + 3]),
            vmac4(s1, w1a[e + 4], p1q, w1b[e + 4]), vmac4(s1, w1a[e + 5], p1q, w1b[e + 5]),
            vmac4(s1, w1a[e + 6], p1q, w1b[e + 6]), vmac4(s1, w1a[e + 7], p1q, w1b[e + 7]),
            vmac4(s1, w1a[e + 8], p1q, w1b[e + 8]), vmac4(s1, w1a[e + 9], p1q, w1b[e + 9]),
            vmac4(s1, w1a[e + 10], p1q, w1b[e + 10]), vmac4(s1, w1a[e + 11], p1q, w1b[e + 11]),
            vmac4(s1, w1a[e + 12], p1q, w1b[e + 12]), vmac4(s1, w1a[e + 13], p1q, w1b[e + 13]),
            vmac4(s1, w1a[e + 14], p1q, w1b[e + 14]), vmac4(s1, w1a[e + 15], p1q, w1b[e + 15])))


@njit
def pop_workspace():
    """s4, s3, h2^2, s2, s1, padded H1^2 (12 planes of 12x12), padded input^2, 25 x 16 partials."""
    return (abuf(10 * L, 0.0), abuf(30 * L, 0.0), abuf(192 * L, 0.0), abuf(192 * L, 0.0), abuf(768 * L, 0.0),
            abuf(12 * HP, 0.0), abuf(400 * L + L, 0.0), abuf(25 * 16 * L, 0.0))


@njit
def pop_curvature(Hn, P, xpad, h1p, d1, h2, d2, km, h3, d3, y, d4, has_keep, loss, table, h1pos, ws):
    """Hn <- the estimate, population layout (lane = replica), in solo_curvature's order per lane."""
    s4, s3, h2q, s2, s1, h1q, xq, part25 = ws
    zero = vzero()
    for r in range(L):
        loss_curv(y, d4, r, L, loss, s4)
    for q in range(10):
        vstore(Hn, Q4B + q * L, vload(s4, q * L))
    for m in range(30):
        hq = vsq(vload(h3, m * L))
        acc = zero
        for q in range(10):
            w = vsq(vload(P, Q4W + (q * 30 + m) * L))
            sq = vload(s4, q * L)
            acc = vmul(w, sq) if q == 0 else vfma(w, sq, acc)
            vstore(Hn, Q4W + (q * 30 + m) * L, vmul(sq, hq))
        t = vmul(acc, vsq(vload(d3, m * L)))
        vstore(s3, m * L, t)
        vstore(Hn, Q3B + m * L, t)
    for u in range(192):
        vstore(h2q, u * L, vsq(vload(h2, u * L)))
    for u0 in range(0, 192, 8):
        for m in range(30):
            sm = vload(s3, m * L)
            w = Q3W + (m * 192 + u0) * L
            w0, w1, w2, w3 = vsq(vload(P, w)), vsq(vload(P, w + L)), vsq(vload(P, w + 2 * L)), vsq(vload(P, w + 3 * L))
            w4, w5 = vsq(vload(P, w + 4 * L)), vsq(vload(P, w + 5 * L))
            w6, w7 = vsq(vload(P, w + 6 * L)), vsq(vload(P, w + 7 * L))
            if m == 0:
                c0, c1, c2, c3 = vmul(w0, sm), vmul(w1, sm), vmul(w2, sm), vmul(w3, sm)
                c4, c5, c6, c7 = vmul(w4, sm), vmul(w5, sm), vmul(w6, sm), vmul(w7, sm)
            else:
                c0, c1, c2, c3 = vfma(w0, sm, c0), vfma(w1, sm, c1), vfma(w2, sm, c2), vfma(w3, sm, c3)
                c4, c5, c6, c7 = vfma(w4, sm, c4), vfma(w5, sm, c5), vfma(w6, sm, c6), vfma(w7, sm, c7)
        for j, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7)):
            vstore(s2, (u0 + j) * L, c)
    for u in range(192):
        t = vload(s2, u * L)
        if has_keep:
            t = vmul(t, vsq(vload(km, u * L)))
        t = vmul(t, vsq(vload(d2, u * L)))
        vstore(s2, u * L, t)
        vstore(Hn, Q2B + u * L, t)
    # ---- H2 -> H1: H2 positions in decreasing order per plane (= solo's window order)
    for i in range(768):
        vstore(s1, i * L, zero)
    for i in range(12):
        ga = 0 if i < 8 else 1
        gb = 1 if 4 <= i < 8 else 2
        ja = i if ga == 0 else i - 4
        jb = i - 4 if (gb == 1 or i >= 8) else i
        for q in range(15, -1, -1):
            oy2, ox2 = q // 4, q % 4
            sa0, sa1 = vload(s2, (64 * ga + q) * L), vload(s2, (64 * ga + 16 + q) * L)
            sa2, sa3 = vload(s2, (64 * ga + 32 + q) * L), vload(s2, (64 * ga + 48 + q) * L)
            sb0, sb1 = vload(s2, (64 * gb + q) * L), vload(s2, (64 * gb + 16 + q) * L)
            sb2, sb3 = vload(s2, (64 * gb + 32 + q) * L), vload(s2, (64 * gb + 48 + q) * L)
            for ky in range(max(0, 2 - 2 * oy2), min(5, 10 - 2 * oy2)):
                for kx in range(max(0, 2 - 2 * ox2), min(5, 10 - 2 * ox2)):
                    wa = Q2W + ((4 * ga) * 200 + ja * 25 + ky * 5 + kx) * L
                    wb = Q2W + ((4 * gb) * 200 + jb * 25 + ky * 5 + kx) * L
                    t = vmul(vsq(vload(P, wa)), sa0)
                    t = vfma(vsq(vload(P, wa + 200 * L)), sa1, t)
                    t = vfma(vsq(vload(P, wa + 400 * L)), sa2, t)
                    t = vfma(vsq(vload(P, wa + 600 * L)), sa3, t)
                    t2 = vmul(vsq(vload(P, wb)), sb0)
                    t2 = vfma(vsq(vload(P, wb + 200 * L)), sb1, t2)
                    t2 = vfma(vsq(vload(P, wb + 400 * L)), sb2, t2)
                    t2 = vfma(vsq(vload(P, wb + 600 * L)), sb3, t2)
                    e = (i * 64 + (2 * oy2 + ky - 2) * 8 + 2 * ox2 + kx - 2) * L
                    vstore(s1, e, vadd(vadd(vload(s1, e), t), t2))
    for i in range(768):
        t = vmul(vload(s1, i * L), vsq(vload(d1, i * L)))
        vstore(s1, i * L, t)
        vstore(Hn, Q1B + i * L, t)
    # ---- W2: planes o, o+1, sums over H2 positions in order of s2 * padded H1^2
    for e in range(12 * 144):
        vstore(h1q, e * L, vsq(vload(h1p, e * L)))
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
                    da, de = vload(s2, (o * 16 + q) * L), vload(s2, (o * 16 + 16 + q) * L)
                    xb = pl + ((2 * (q // 4) + ky) * 12 + 2 * (q % 4)) * L
                    x0, x1, x2 = vload(h1q, xb), vload(h1q, xb + L), vload(h1q, xb + 2 * L)
                    x3, x4 = vload(h1q, xb + 3 * L), vload(h1q, xb + 4 * L)
                    if q == 0:
                        c0, c1, c2, c3, c4 = vmul(da, x0), vmul(da, x1), vmul(da, x2), vmul(da, x3), vmul(da, x4)
                        c5, c6, c7, c8, c9 = vmul(de, x0), vmul(de, x1), vmul(de, x2), vmul(de, x3), vmul(de, x4)
                    else:
                        c0, c1, c2 = vfma(da, x0, c0), vfma(da, x1, c1), vfma(da, x2, c2)
                        c3, c4 = vfma(da, x3, c3), vfma(da, x4, c4)
                        c5, c6, c7 = vfma(de, x0, c5), vfma(de, x1, c6), vfma(de, x2, c7)
                        c8, c9 = vfma(de, x3, c8), vfma(de, x4, c9)
                w = Q2W + (o * 200 + j * 25 + ky * 5) * L
                for k, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7, c8, c9)):
                    vstore(Hn, w + (k // 5) * 200 * L + (k % 5) * L, c)
    # ---- W1: solo's 16 lanes (phases in order), then the tree
    for e in range(401):
        vstore(xq, e * L, vsq(vload(xpad, e * L)))
    for c in range(12):
        for ll in range(16):
            p0, p1, p2, p3 = h1pos[ll], h1pos[16 + ll], h1pos[32 + ll], h1pos[48 + ll]
            z0, z1 = vload(s1, (c * 64 + p0) * L), vload(s1, (c * 64 + p1) * L)
            z2, z3 = vload(s1, (c * 64 + p2) * L), vload(s1, (c * 64 + p3) * L)
            x0 = ((2 * (p0 // 8)) * 20 + 2 * (p0 % 8)) * L
            x1 = ((2 * (p1 // 8)) * 20 + 2 * (p1 % 8)) * L
            x2 = ((2 * (p2 // 8)) * 20 + 2 * (p2 % 8)) * L
            x3 = ((2 * (p3 // 8)) * 20 + 2 * (p3 % 8)) * L
            for ky in range(5):
                for kx in range(5):
                    o = (ky * 20 + kx) * L
                    acc = vmul(z0, vload(xq, x0 + o))
                    acc = vfma(z1, vload(xq, x1 + o), acc)
                    acc = vfma(z2, vload(xq, x2 + o), acc)
                    acc = vfma(z3, vload(xq, x3 + o), acc)
                    vstore(part25, ((ky * 5 + kx) * 16 + ll) * L, acc)
        for k in range(25):
            vstore(Hn, Q1W + (c * 25 + k) * L, tree16(part25[k * 256:(k + 1) * 256]))
