"""Index tables and parameter layouts of the fast engine's kernels.

The solo kernel (one replica, lanes = image positions) keeps the parameters in layouts
chosen for its loops; the population kernel (lanes = replicas) keeps torch's layouts
with a trailing lane axis. This module builds the constant tables both use and converts
between the torch layouts (PARAM_SHAPES) and the internal flat float32 arrays.

Solo positions. H1's 8x8 outputs are stored phase-major: position q = ph*16 + l with
ph = 2a + b and l = 4u + v for (oy, ox) = (2u + a, 2v + b) (H1_POS maps q -> oy*8+ox).
One phase is one 16-lane vector, and H2's 5x5 stride-2 windows over the -1-padded H1
plane are then one two-source permute of a phase vector and a vector of -1 (win; winv
is the adjoint, for the backward pass). H2's 4x4 outputs are row-major (4*oy2 + ox2),
as torch flattens them.

Solo parameters (SOLO_OFFSETS, one flat float32 vector, zeros where no parameter):
  h1_w (300 + 4)  torch order          h1_b (12, 64) phase-major positions
  h2_w (12, 5, 64) [o, ky, kx*12 + input plane]: all 12 planes, zeros off the table, so
                  dW2 is 16-lane runs of H1T (each padded H1 position's 12 planes side by
                  side) without gathers
  h2_b (12, 16)   h3_w, h3_b (30 + 2)   out_w (10, 32)   out_b (10 + 6)
Population parameters (POP_OFFSETS): torch layouts, flat, with a trailing axis of 16
lanes (replica r of a block in lane r).
"""
import numpy as np

from ..models.net1989 import H2_TABLE, PARAM_NAMES, PARAM_SHAPES

L = 16                                     # lanes per vector
W2R = 64                                   # solo W2 row: 5 taps (kx) x 12 input planes, + 4 zero lanes
H1TS = 12                                  # solo H1T: 12 planes per position record


def _h1_pos():
    """(64,) oy*8+ox of internal H1 position q = ph*16 + 4u + v."""
    out = np.empty(64, np.int64)
    for a in range(2):
        for b in range(2):
            for u in range(4):
                for v in range(4):
                    out[(2 * a + b) * 16 + 4 * u + v] = (2 * u + a) * 8 + (2 * v + b)
    return out


H1_POS = _h1_pos()


def solo_tables() -> dict:
    """Constant int32 tables of the solo kernel (see the kernel for their use)."""
    t = {}
    # X4: xpad (20x20) split by 4 in each direction: block r*4+s holds xpad[4u+r, 4v+s],
    # u, v in 0..4 (25 floats, stride 32; the 7 spare lanes read xpad[0], always -1).
    x4 = np.zeros((16, 32), np.int32)
    for r in range(4):
        for s in range(4):
            for u in range(5):
                for v in range(5):
                    x4[r * 4 + s, u * 5 + v] = (4 * u + r) * 20 + 4 * v + s
    t["x4"] = x4.ravel()
    # P1 vector (tap k, phase ph) = 4x4 window at offset (qy, qx) of X4 block (r, s)
    p1src = np.empty((25, 4, 2), np.int32)
    for ky in range(5):
        for kx in range(5):
            for a in range(2):
                for b in range(2):
                    r, qy = (2 * a + ky) % 4, (2 * a + ky) // 4
                    s, qx = (2 * b + kx) % 4, (2 * b + kx) // 4
                    p1src[ky * 5 + kx, 2 * a + b] = (r * 4 + s, qy * 2 + qx)
    t["p1src"] = p1src.ravel()
    p1win = np.empty((4, 16), np.int32)
    for qy in range(2):
        for qx in range(2):
            for u in range(4):
                for v in range(4):
                    p1win[qy * 2 + qx, 4 * u + v] = (u + qy) * 5 + v + qx
    t["p1win"] = p1win.ravel()
    # H2 windows: lane l2 = (oy2, ox2) of the window at (sy, sx) takes phase lane (oy2+sy-1, ox2+sx-1), else -1
    win = np.empty((9, 16), np.int32)
    winv = np.empty((9, 16), np.int32)
    for sy in range(3):
        for sx in range(3):
            for i in range(4):
                for j in range(4):
                    u, v = i + sy - 1, j + sx - 1
                    win[sy * 3 + sx, 4 * i + j] = 4 * u + v if (0 <= u < 4 and 0 <= v < 4) else 16
                    # adjoint: phase lane (i, j) receives window lane (i-sy+1, j-sx+1)
                    y, x = i - sy + 1, j - sx + 1
                    winv[sy * 3 + sx, 4 * i + j] = 4 * y + x if (0 <= y < 4 and 0 <= x < 4) else 16
    t["win"], t["winv"] = win.ravel(), winv.ravel()
    # H1T record of position (oy, ox): the 12 planes' values, gathered from h1 (phase layout)
    g1t = np.zeros((64, 16), np.int32)
    for pos in range(64):
        q = int(np.where(H1_POS == pos)[0][0])
        g1t[pos, :12] = np.arange(12) * 64 + q
    t["g1t"] = g1t.ravel()
    # dW1 batches: lane source e = c*25 + k -> dz1 offset c*64 and P1 offset k*64 (e >= 300: zeros)
    e = np.arange(304)
    t["w1a"] = np.where(e < 300, (e // 25) * 64, 768).astype(np.int32)
    t["w1b"] = np.where(e < 300, (e % 25) * 64, 0).astype(np.int32)
    # dW2 masks: lane kx*12 + p of a W2 row is a weight of output group g iff p is one of its planes
    m2 = np.zeros((3, W2R), np.float32)
    for g in range(3):
        for kx in range(5):
            m2[g, kx * 12 + H2_TABLE[4 * g]] = 1.0
    t["m2"] = m2.ravel()
    return t


# ---- parameter layouts -------------------------------------------------------------

SOLO_SIZES = {"h1_w": 304, "h1_b": 768, "h2_w": 12 * 5 * W2R, "h2_b": 192, "h3_w": 5760, "h3_b": 32,
              "out_w": 320, "out_b": 16}
SOLO_OFFSETS = {}
_o = 0
for _n in PARAM_NAMES:
    SOLO_OFFSETS[_n] = _o
    _o += SOLO_SIZES[_n]
SOLO_OFFSETS["total"] = _o                 # 11,216 floats: the 9,760 parameters and zero lanes


def to_solo(p: dict) -> np.ndarray:
    """torch-layout dict -> the solo kernel's flat parameter vector (zero where no parameter)."""
    f = lambda name: np.asarray(p[name], np.float32)
    w1 = np.zeros(304, np.float32)
    w1[:300] = f("h1_w").reshape(300)
    b1 = f("h1_b").reshape(12, 64)[:, H1_POS]
    w2 = np.zeros((12, 5, W2R), np.float32)
    h2w = f("h2_w")
    for o in range(12):
        for j in range(8):
            for kx in range(5):
                w2[o, :, kx * 12 + H2_TABLE[o, j]] = h2w[o, j, :, kx]
    b3 = np.zeros(32, np.float32)
    b3[:30] = f("h3_b")
    w4 = np.zeros((10, 32), np.float32)
    w4[:, :30] = f("out_w")
    b4 = np.zeros(16, np.float32)
    b4[:10] = f("out_b")
    parts = {"h1_w": w1, "h1_b": b1, "h2_w": w2, "h2_b": f("h2_b"), "h3_w": f("h3_w"), "h3_b": b3,
             "out_w": w4, "out_b": b4}
    return np.concatenate([parts[n].ravel() for n in PARAM_NAMES]).astype(np.float32)


def from_solo(flat: np.ndarray) -> dict:
    """Inverse of to_solo -> torch-layout float32 arrays."""
    s = {n: flat[SOLO_OFFSETS[n]:SOLO_OFFSETS[n] + SOLO_SIZES[n]] for n in PARAM_NAMES}
    b1 = np.empty((12, 64), np.float32)
    b1[:, H1_POS] = s["h1_b"].reshape(12, 64)
    w2s = s["h2_w"].reshape(12, 5, W2R)
    w2 = np.empty((12, 8, 5, 5), np.float32)
    for o in range(12):
        for j in range(8):
            for kx in range(5):
                w2[o, j, :, kx] = w2s[o, :, kx * 12 + H2_TABLE[o, j]]
    out = {"h1_w": s["h1_w"][:300], "h1_b": b1, "h2_w": w2, "h2_b": s["h2_b"], "h3_w": s["h3_w"],
           "h3_b": s["h3_b"][:30], "out_w": s["out_w"].reshape(10, 32)[:, :30], "out_b": s["out_b"][:10]}
    return {n: np.array(out[n], np.float32, copy=True).reshape(PARAM_SHAPES[n]) for n in PARAM_NAMES}


# The population kernel: torch layouts (PARAM_NAMES order, flat) with a trailing axis of
# 16 lanes, one replica per lane.
POP_SIZES = {n: int(np.prod(PARAM_SHAPES[n])) * L for n in PARAM_NAMES}
POP_OFFSETS = {}
_o = 0
for _n in PARAM_NAMES:
    POP_OFFSETS[_n] = _o
    _o += POP_SIZES[_n]
POP_OFFSETS["total"] = _o                  # 9,760 x 16 floats per block of 16 replicas


def to_pop(plist: list) -> np.ndarray:
    """R torch-layout dicts -> (B, POP_OFFSETS['total']) float32, B = ceil(R/16) blocks,
    replica r in block r // 16, lane r % 16. Spare lanes hold copies of replica 0 so every
    lane computes finite numbers; their results are never read."""
    nb = (len(plist) + L - 1) // L
    out = np.empty((nb, POP_OFFSETS["total"]), np.float32)
    for b in range(nb):
        for name in PARAM_NAMES:
            lanes = [np.asarray(plist[r if r < len(plist) else 0][name], np.float32).reshape(-1)
                     for r in range(b * L, (b + 1) * L)]
            o = POP_OFFSETS[name]
            out[b, o:o + POP_SIZES[name]] = np.stack(lanes, axis=1).ravel()
    return out


def from_pop(arr: np.ndarray, r: int) -> dict:
    """Replica r of to_pop's array -> torch-layout dict."""
    b, lane = divmod(r, L)
    out = {}
    for name in PARAM_NAMES:
        o = POP_OFFSETS[name]
        a = arr[b, o:o + POP_SIZES[name]].reshape(-1, L)[:, lane]
        out[name] = np.array(a, np.float32, copy=True).reshape(PARAM_SHAPES[name])
    return out
