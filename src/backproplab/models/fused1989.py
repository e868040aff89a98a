"""The 1989 net (ReLU, logits out) as a few large matrix products, for minibatch populations.

Same function and parameters as Net1989(act="relu", out_act="none"); written for speed on
one CPU core, with a hand-written backward pass (checked against autograd in the tests).
All R replicas' parameters live in one tensor theta (R, 9760), Net1989's PARAM_NAMES order.

Why it is fast: the 5x5 stride-2 convolutions with 12 output planes are poor matrix
products as im2col (N = 12). Instead each convolution becomes one dense product with a
Toeplitz matrix rebuilt from the weights every step:
  H1  the 8x8 output splits into 4 groups of 2 rows; group g sees padded input rows
      4g..4g+6, and the map from that 7x16 window to its 2x8x12 outputs is the same matrix
      for every g. So H1 = (4B, 112) @ (112, 192) per replica: 86k multiply-adds an image
      instead of 196k for a full 256 -> 768 Toeplitz matrix.
  H2  one (B, 768) @ (768, 192) product with the connection table's zeros in the matrix.
Padding with -1: with inputs shifted by +1 the padding becomes 0 and a conv of the
-1-padded input equals conv(x + 1, zero padding) - (sum of the plane's weights), so the
pad taps vanish from the matrices and cost one subtraction per output plane.
Layouts: x (R, B, 320) is x + 1 with two zero rows above and below (20 x 16); H1's
output is HWC (8, 8, 12) so the row groups are contiguous; H2's output is CHW like Net1989.
Measured on this machine's core and left out (one thread, under load, so ratios only):
nn.Conv2d autograd 42 us an image at batch 512 (channels-last no better), im2col with
unfold 65 us, this file 18-25 us; torch.compile of loss_and_grad 6.0 ms a step against
5.1 eager (and 98 s to compile); bf16 products 3.8x slower than fp32 (no AVX512-BF16 here).
"""
import numpy as np
import torch
import torch.nn.functional as F

from .net1989 import H2_TABLE, PARAM_NAMES, PARAM_SHAPES, init_params

SIZES = [int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES]
OFFSETS = dict(zip(PARAM_NAMES, np.cumsum([0] + SIZES)[:-1].tolist()))
N_THETA = sum(SIZES)  # 9,760
DROP_UNITS = 192      # dropout acts on H2's outputs, as in Net1989


def _maps(entries, n_w, n_in, n_out) -> dict:
    """entries (w, i, o): weight w sits at row i, column o of the (n_in, n_out) matrix.
    -> pos/widx to build the matrix, and taps (n_w, m) + mask to sum its gradient back."""
    e = np.array(entries, dtype=np.int64)
    pos = e[:, 1] * n_out + e[:, 2]
    per_w = [[] for _ in range(n_w)]
    for w, p in zip(e[:, 0], pos):
        per_w[w].append(p)
    m = max(len(t) for t in per_w)
    taps = np.zeros((n_w, m), np.int64)
    mask = np.zeros((n_w, m), np.float32)
    for w, t in enumerate(per_w):
        taps[w, :len(t)], mask[w, :len(t)] = t, 1.0
    return {"pos": torch.from_numpy(pos), "widx": torch.from_numpy(e[:, 0]), "taps": torch.from_numpy(taps.ravel()),
            "mask": torch.from_numpy(mask), "n_in": n_in, "n_out": n_out}


def _h1_entries():  # weight (o, ky, kx) -> window (2dr + ky, ix) x output (dr, ox, o)
    out = []
    for o in range(12):
        for ky in range(5):
            for kx in range(5):
                for dr in range(2):
                    for ox in range(8):
                        ix = 2 * ox + kx - 2
                        if 0 <= ix < 16:
                            out.append(((o * 5 + ky) * 5 + kx, (2 * dr + ky) * 16 + ix, (dr * 8 + ox) * 12 + o))
    return out


def _h2_entries():  # weight (o, j, ky, kx), j-th input plane of o's table -> HWC input x CHW output
    out = []
    for o in range(12):
        for j, c in enumerate(H2_TABLE[o]):
            for ky in range(5):
                for kx in range(5):
                    for oy in range(4):
                        for ox in range(4):
                            iy, ix = 2 * oy + ky - 2, 2 * ox + kx - 2
                            if 0 <= iy < 8 and 0 <= ix < 8:
                                out.append((((o * 8 + j) * 5 + ky) * 5 + kx, (iy * 8 + ix) * 12 + int(c),
                                            (o * 4 + oy) * 4 + ox))
    return out


M1 = _maps(_h1_entries(), 300, 112, 192)
M2 = _maps(_h2_entries(), 2400, 768, 192)


def views(theta: torch.Tensor) -> dict:
    """theta (R, 9760) -> name: (R, size) views."""
    return {n: theta[:, OFFSETS[n]:OFFSETS[n] + s] for n, s in zip(PARAM_NAMES, SIZES)}


def init_theta(seeds) -> torch.Tensor:
    """(R, 9760): Net1989's 1989 init for each seed, so replica r starts where Net1989(seed) does."""
    return torch.stack([torch.cat([init_params(s)[n].reshape(-1) for n in PARAM_NAMES]) for s in seeds])


def to_params(theta_row: torch.Tensor) -> dict:
    """One replica's row -> Net1989 parameter dict (numpy, PARAM_SHAPES)."""
    v = views(theta_row.reshape(1, -1))
    return {n: v[n].reshape(PARAM_SHAPES[n]).numpy().copy() for n in PARAM_NAMES}


def prep(x: torch.Tensor) -> torch.Tensor:
    """x (..., 1, 16, 16), (..., 16, 16) or (..., 256) in [-1, 1] -> (..., 320): x + 1 with two zero
    rows above and below."""
    if x.shape[-1] == 256:
        lead = x.shape[:-1]
    else:
        lead = x.shape[:-3] if x.dim() >= 3 and x.shape[-3:] == (1, 16, 16) else x.shape[:-2]
    return F.pad((x.reshape(*lead, 16, 16) + 1.0), (0, 0, 2, 2)).reshape(*lead, 320)


def _windows(xp):  # (R, B, 320) -> (R, 4B, 112): group g = padded rows 4g..4g+6 (overlapping views, then one copy)
    R, B, _ = xp.shape
    xp = xp.contiguous()
    return xp.as_strided((R, B, 4, 112), (B * 320, 320, 64, 1)).reshape(R, 4 * B, 112)


_BUFFERS = {}  # (layer, R) -> (R, n_in * n_out) matrix whose off-pattern entries stay 0 from step to step


def _matrix(w, M):  # w (R, n_w) -> (R, n_in, n_out); valid until the next call for the same layer and R
    key = (M["n_in"], w.shape[0], w.dtype)
    T = _BUFFERS.get(key)
    if T is None:  # the pattern's zeros are written once; every call overwrites the same positions
        T = _BUFFERS[key] = w.new_zeros(w.shape[0], M["n_in"] * M["n_out"])
    T.index_copy_(1, M["pos"], torch.index_select(w, 1, M["widx"]))
    return T.view(-1, M["n_in"], M["n_out"])


def _tapsum(dT, M):  # (R, n_in, n_out) -> (R, n_w): each weight's gradient summed over its places
    R, m = dT.shape[0], M["mask"].shape[1]
    return (torch.index_select(dT.reshape(R, -1), 1, M["taps"]).view(R, -1, m) * M["mask"]).sum(-1)


def _forward(V, R, B, xw):
    """-> (T1, T2, h1 (R, B, 768) HWC, u1 = h1 + 1, h2 (R, B, 192))."""
    T1, T2 = _matrix(V["h1_w"], M1), _matrix(V["h2_w"], M2)
    c1 = (V["h1_b"].view(R, 12, 64).transpose(1, 2) - V["h1_w"].view(R, 1, 12, 25).sum(-1)).contiguous()  # (R, 64, 12)
    c2 = V["h2_b"] - V["h2_w"].view(R, 12, 1, 200).sum(-1).expand(R, 12, 16).reshape(R, 192)
    h1 = torch.bmm(xw, T1).view(R, B, 64, 12).add_(c1.unsqueeze(1)).clamp_min_(0).view(R, B, 768)
    u1 = h1 + 1.0                                   # H2's input with its -1 padding moved to 0
    h2 = torch.baddbmm(c2.unsqueeze(1), u1, T2).clamp_min_(0)
    return T1, T2, h1, u1, h2


def _head(V, R, h2):
    W3, Wo = V["h3_w"].view(R, 30, 192), V["out_w"].view(R, 10, 30)
    h3 = torch.baddbmm(V["h3_b"].unsqueeze(1), h2, W3.transpose(1, 2)).clamp_min_(0)   # (R, B, 30)
    return W3, Wo, h3, torch.baddbmm(V["out_b"].unsqueeze(1), h3, Wo.transpose(1, 2))  # (R, B, 10)


@torch.no_grad()
def logits(theta: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """theta (R, 9760); xp (B, 320) prepped, shared by all replicas -> (R, B, 10)."""
    R, B = theta.shape[0], xp.shape[0]
    V = views(theta)
    xw = _windows(xp.unsqueeze(0)).expand(R, -1, -1)
    h2 = _forward(V, R, B, xw)[4]
    return _head(V, R, h2)[3]


def loss_and_grad(theta, xp, labels, keep=None, smooth=0.0):
    """theta (R, 9760); xp (R, B, 320); labels (R, B); keep (R, B, 192) float mask already scaled
    by 1/(1-p) or None; smooth: label smoothing. -> (loss (R,) mean cross-entropy, grad (R, 9760))."""
    R, B, _ = xp.shape
    V = views(theta)
    xw = _windows(xp)
    T1, T2, h1, u1, h2 = _forward(V, R, B, xw)
    h2d = h2 * keep if keep is not None else h2
    W3, Wo, h3, out = _head(V, R, h2d)
    logp = torch.log_softmax(out, -1)
    target = torch.full_like(out, smooth / 10).scatter_(2, labels.unsqueeze(-1), 1.0 - smooth + smooth / 10)
    loss = -(target * logp).sum(-1).mean(-1)
    g = (logp.exp_() - target).mul_(1.0 / B)                                     # dloss/dlogits (R, B, 10)
    G = torch.empty_like(theta)
    GV = views(G)
    GV["out_w"].view(R, 10, 30).copy_(torch.bmm(g.transpose(1, 2), h3))
    GV["out_b"].copy_(g.sum(1))
    d3 = torch.ops.aten.threshold_backward(torch.bmm(g, Wo), h3, 0.0)           # (R, B, 30)
    GV["h3_w"].view(R, 30, 192).copy_(torch.bmm(d3.transpose(1, 2), h2d))
    GV["h3_b"].copy_(d3.sum(1))
    d2 = torch.bmm(d3, W3)                                                       # (R, B, 192)
    if keep is not None:
        d2.mul_(keep)
    d2 = torch.ops.aten.threshold_backward(d2, h2, 0.0)
    dc2 = d2.sum(1)
    GV["h2_b"].copy_(dc2)
    GV["h2_w"].copy_(_tapsum(torch.bmm(u1.transpose(1, 2), d2), M2)
                     - dc2.view(R, 12, 16).sum(-1, keepdim=True).expand(R, 12, 200).reshape(R, 2400))
    d1 = torch.ops.aten.threshold_backward(torch.bmm(d2, T2.transpose(1, 2)), h1, 0.0)   # (R, B, 768) HWC
    dc1 = d1.view(R, B, 64, 12).sum(1)                                                   # (R, 64, 12)
    GV["h1_b"].view(R, 12, 64).copy_(dc1.transpose(1, 2))
    GV["h1_w"].copy_(_tapsum(torch.bmm(xw.transpose(1, 2), d1.view(R, 4 * B, 192)), M1)
                     - dc1.sum(1).unsqueeze(-1).expand(R, 12, 25).reshape(R, 300))
    return loss, G
