"""ModNet's forward for a whole population at once: one op sequence over R replicas.

StackedModNet(model, R) reads a ModNet's switches (every option: norm, blocks, ReZero,
ws, dropout, DropConnect, spatial dropout, stochastic depth) and runs R replicas of it in
one forward: parameters are (R, *shape) tensors (the engine passes views of its (R, P)
weight buffer, or leaves whose gradients are then the (R, P) gradient), inputs are
(R, B, 1, 16, 16) (each replica's batch) or (B, 1, 16, 16) (shared), outputs (R, B, 10).

Layout: the replicas are the groups of grouped convolutions over channels-last tensors,
(B, R * C, H, W) with memory order (B, H, W, R, C). Measured on this machine (one thread,
R = 8, batch 32, forward and backward): channels-last grouped convolutions cost half of
their NCHW versions, and beat the per-replica loop, the fused products' Toeplitz matrices
built under autograd and 3x3 row-band matrices; H2's connection table is a dense weight
with zeros (12 -> 12 per group; gathering the 8 input planes for 3 groups per replica cost
twice as much). H3 and the output layer are batched matrix products (R, B, .).

Per replica semantics, as R separate ModNet modules have them:
  noise     each replica's masks are drawn from its own generator (gens[r], the engine's
            (seed, pass) stream), in the order and shapes a solo ModNet draws them;
  BatchNorm statistics per replica and channel (a channel of the grouped layout is one
            replica's channel), running buffers (R, C) per site in self.bufs, which the
            engine aliases into each module's own buffers (checkpoints keep their format);
  group/layer norm: per example over one replica's channels (R * groups groups).
The rounding differs from the loop's (other convolution kernels), not the maths: tests
compare outputs and gradients against the per-replica modules to float tolerance.
"""
import math

import torch
import torch.nn.functional as F

from ._conv import grouped_conv, h1_conv
from .modnet import dropout_mask, scaled_ws_rows
from .net1989 import H2_TABLE, activation

_CL = torch.channels_last


def _rep(t: torch.Tensor, c: int) -> torch.Tensor:
    """(R,) or (B, R) per replica values -> one per channel of the grouped layout (..., R * c)."""
    return t.unsqueeze(-1).expand(*t.shape, c).reshape(*t.shape[:-1], t.shape[-1] * c)


def border_taps(side: int, k: int = 5, stride: int = 2, pad: int = 2) -> torch.Tensor:
    """(out positions, k * k) float: 1 where the tap of a k x k, stride convolution of a side x side
    image padded by `pad` reads the padding. A map padded with a constant c convolves as the
    zero-padded map plus c * (sum of the weights over these taps): -1 padding = zero padding
    (the convolution's own, no padded copy) minus each output's border sum."""
    n = (side + 2 * pad - k) // stride + 1
    o = torch.arange(n) * stride - pad                                 # first input row of each output
    t = torch.arange(k)
    out = ((o.view(n, 1) + t.view(1, k)) < 0) | ((o.view(n, 1) + t.view(1, k)) >= side)   # (n, k)
    m = out.view(n, 1, k, 1) | out.view(1, n, 1, k)                    # (oy, ox, ky, kx)
    return m.reshape(n * n, k * k).float()


def _stack_masks(gens, shape, p, dtype):
    """Each replica's keep mask of `shape` from its own generator -> (R, *shape)."""
    return torch.stack([dropout_mask(shape, p, g) for g in gens]).to(dtype)


class StackedModNet:
    def __init__(self, model, R: int):
        self.R = R
        for k in ("norm", "groups", "blocks", "rezero", "ws", "drop", "dropconnect", "spatial", "drop_path_p",
                  "dropout", "out_act", "gain", "sites", "act"):
            setattr(self, k, getattr(model, k))
        self.out_fn = None if self.out_act == "none" else activation(self.out_act)
        idx = torch.from_numpy(H2_TABLE)
        self._h2_index = (torch.arange(R).view(R, 1, 1).expand(R, 12, 8),
                          torch.arange(12).view(1, 12, 1).expand(R, 12, 8), idx.expand(R, 12, 8))
        self._border2 = border_taps(8)                                  # (16, 25)
        # BatchNorm running averages, (R, C) a site: the modules' buffers become rows of these
        self.bufs = {}
        if self.norm == "batch":
            for s, c in self.sites.items():
                self.bufs[f"{s}_rm"] = torch.zeros(R, c)
                self.bufs[f"{s}_rv"] = torch.ones(R, c)

    def to(self, device):
        self.bufs = {n: b.to(device) for n, b in self.bufs.items()}
        self._h2_index = tuple(t.to(device) for t in self._h2_index)
        self._border2 = self._border2.to(device)
        return self

    def _w(self, P, name):  # (R, O, ...) weight, standardized per replica and output unit when ws
        w = P[name]
        if not self.ws:
            return w
        return scaled_ws_rows(w, self.gain)

    def _norm(self, site, a, training, update_stats, momentum):
        """a (B, R * C, ...) grouped layout."""
        if self.norm == "none":
            return a
        w, b = self.P[f"{site}_ng"].reshape(-1), self.P[f"{site}_nb"].reshape(-1)
        if self.norm == "batch":
            rm, rv = self.bufs[f"{site}_rm"].view(-1), self.bufs[f"{site}_rv"].view(-1)
            if training and not update_stats:
                rm = rv = None
            # on an NCHW copy: the channels-last backward kernel lost 3 digits on a channel of tiny
            # variance (2 blocks, shifted digits: 5e-3 off float64, the NCHW kernel 4e-7)
            return F.batch_norm(a.contiguous(), rm, rv, w, b, training, momentum, 1e-5)
        c = self.sites[site]
        groups = 1 if self.norm == "layer" else math.gcd(self.groups, c)
        return F.group_norm(a, self.R * groups, w, b, 1e-5)

    def __call__(self, P, x, keep=None, gens=None, training=True, update_stats=True, momentum=0.1):
        """P name -> (R, *shape); x (R, B, 1, 16, 16) or (B, 1, 16, 16) shared; keep (R, B, 192)
        model.dropout masks; gens the R noise generators (None: no noise) -> (R, B, 10)."""
        R, act = self.R, self.act
        self.P = P
        noisy = training and gens is not None
        if x.dim() == 5:                                                   # (R, B, 1, 16, 16)
            B = x.shape[1]
            x = x.reshape(R, B, 16, 16)
        else:
            B = x.shape[0]
            x = x.reshape(1, B, 16, 16)
        h = h1_conv(x, self._w(P, "h1_w").reshape(R * 12, 1, 5, 5), R, not self.ws)   # (B, R * 12, 8, 8)
        h = act(self._norm("h1", h + P["h1_b"].reshape(1, R * 12, 8, 8), training, update_stats, momentum))
        if self.spatial > 0 and noisy:                                     # (B, R * 12, 8, 8)
            m = _stack_masks(gens, (B, 12, 1, 1), self.spatial, h.dtype)   # (R, B, 12, 1, 1)
            h = h * m.transpose(0, 1).reshape(B, R * 12, 1, 1)
        for i in range(self.blocks):
            a = F.conv2d(h, self._w(P, f"b{i}a_w").reshape(R * 12, 12, 3, 3), P[f"b{i}a_b"].reshape(-1),
                         padding=1, groups=R)
            a = act(self._norm(f"b{i}", a, training, update_stats, momentum))
            a = F.conv2d(a, self._w(P, f"b{i}b_w").reshape(R * 12, 12, 3, 3), P[f"b{i}b_b"].reshape(-1),
                         padding=1, groups=R)
            if self.drop_path_p > 0 and noisy:
                p = self.drop_path_p * (i + 1) / self.blocks
                m = _stack_masks(gens, (B,), p, a.dtype)                   # (R, B)
                a = a * _rep(m.t(), 12).view(B, R * 12, 1, 1)
            if self.rezero:
                a = _rep(P[f"b{i}_alpha"].reshape(R), 12).view(1, R * 12, 1, 1) * a
            h = h + a
        # H2's -1 border as zero padding minus each output's border sum (border_taps): a third less
        # than a padded copy and its convolution, forward and backward (R = 8, batch 32: 3.7 ms ->
        # 2.4 ms). Not under autocast (bf16): there the border sum would be rounded apart from the
        # convolution's products, and bf16's oracle is the padded forward under autocast. H1 keeps
        # its padded copy: the saving is small there (0.75 -> 0.63 ms) and a blank window of
        # standardized weights (nf) sums to 0 exactly, on ReLU's kink, where the kernels' rounding
        # and this one's would take opposite slopes. The input gradient of this convolution is a
        # product and a scatter (models/_conv.py): 1.0 ms against oneDNN's 2.35 at R = 8, batch 32.
        w2 = self._w(P, "h2_w")
        w2 = w2.new_zeros(R, 12, 12, 5, 5).index_put(self._h2_index, w2).reshape(R * 12, 12, 5, 5)
        b2 = P["h2_b"].reshape(1, R * 12, 4, 4)
        if torch.is_autocast_enabled(h.device.type):
            h = F.conv2d(F.pad(h, (2, 2, 2, 2), value=-1.0).contiguous(memory_format=_CL), w2, stride=2, groups=R)
        else:
            h = grouped_conv(h, w2, R, 2, 2)                               # (B, R * 12, 4, 4)
            b2 = b2 - (w2.sum(1).reshape(R * 12, 1, 25) * self._border2).sum(-1).view(1, R * 12, 4, 4)
        h = act(self._norm("h2", h + b2, training, update_stats, momentum))
        z = h.unflatten(1, (R, 12)).transpose(0, 1).reshape(R, B, 192)   # each replica's CHW flatten
        if keep is not None:
            z = z * keep.to(z.dtype) * (1.0 / (1.0 - self.dropout))
        if self.drop > 0 and noisy:
            z = z * _stack_masks(gens, (B, 192), self.drop, z.dtype)
        w3 = self._w(P, "h3_w")                                            # (R, 30, 192)
        if self.dropconnect > 0 and noisy:
            from .noise import hashed_keep   # numba: imported where a mask is drawn
            m = torch.stack([hashed_keep((B, 30, 192), self.dropconnect, g) for g in gens]).to(z.dtype)
            a3 = torch.einsum("rbi,rboi->rbo", z, w3.unsqueeze(1) * m) + P["h3_b"].unsqueeze(1)
        else:
            a3 = torch.bmm(z, w3.transpose(1, 2)) + P["h3_b"].unsqueeze(1)     # (R, B, 30)
        if self.norm != "none":
            a3 = self._norm("h3", a3.transpose(0, 1).reshape(B, R * 30), training, update_stats, momentum)
            a3 = a3.view(B, R, 30).transpose(0, 1)
        out = torch.bmm(act(a3), P["out_w"].transpose(1, 2)) + P["out_b"].unsqueeze(1)   # (R, B, 10)
        self.P = None
        return out if self.out_fn is None else self.out_fn(out)
