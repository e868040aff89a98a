"""ModNet: the 1989 net's layers with switches for the model-structure methods.

Without options it is Net1989, op for op (same init, same outputs bit for bit); the
options add, in forward order:
  H1 conv (12x8x8) -> [norm] -> act -> [spatial dropout: whole maps]
  [blocks x: x + s * drop_path(conv_b(act([norm](conv_a(x)))))]   s = 1, or a (ReZero, a0 = 0)
  H2 conv (12x4x4) -> [norm] -> act -> flatten 192 -> [keep mask (model.dropout)] -> [dropout]
  H3 (30) with [DropConnect] -> [norm] -> act -> out (10)
ws: scaled weight standardization of the H1, H2, H3 and block weights (normalizer-free).
norm: none | batch | layer (GroupNorm with 1 group) | group (gcd(groups, C) groups).
Noise is drawn from self.gen (the engine's (seed, pass) generator), only in training mode;
with gen None the model is deterministic. update_stats=False freezes BatchNorm's running
averages (SAM's second pass); bn_momentum 1/k on the k-th batch makes them cumulative
(recomputation for averaged weights).
Parameter order: Net1989's PARAM_NAMES, then the extras in creation order.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .net1989 import PARAM_NAMES, Net1989, activation

BLOCK_PARAMS = 2 * (12 * 12 * 9 + 12)
BLOCK_MACS = 2 * 8 * 8 * 12 * 12 * 9


def act_gain(name: str) -> float:
    """gamma = 1 / std(act(z)), z ~ N(0, 1) (NF-ResNets), by the trapezoid rule on [-12, 12]
    (ReLU's kink rules out Gauss-Hermite); ReLU: sqrt(2 / (1 - 1/pi)) = 1.71286."""
    z = np.linspace(-12.0, 12.0, 240_001)
    wq = np.exp(-z * z / 2)
    wq /= wq.sum()
    y = activation(name)(torch.as_tensor(z)).numpy()
    return float(1.0 / np.sqrt((wq * y ** 2).sum() - (wq * y).sum() ** 2))


def scaled_ws(w: torch.Tensor, gain: float, eps: float = 1e-4) -> torch.Tensor:
    """gain * (w - mean) / sqrt(var * fan_in) per output unit (first axis)."""
    fan_in = w[0].numel()
    mean = w.mean(dim=tuple(range(1, w.ndim)), keepdim=True)
    var = w.var(dim=tuple(range(1, w.ndim)), keepdim=True, unbiased=False)
    return gain * (w - mean) * torch.rsqrt(torch.clamp(var * fan_in, min=eps))


def scaled_ws_rows(w: torch.Tensor, gain: float) -> torch.Tensor:
    """scaled_ws of a population's weight (R, O, ...): per replica and output unit."""
    return scaled_ws(w.reshape(-1, *w.shape[2:]), gain).view(w.shape)


def ws_names(names) -> list:
    """The parameters ModNet's weight standardization (ws) applies to: every weight but the output
    layer's (H1, H2, H3 and the residual blocks' convolutions)."""
    return [n for n in names if n.endswith("_w") and n != "out_w"]


def dropout_mask(shape, p: float, gen) -> torch.Tensor:
    """Keep mask scaled 1/(1-p): zero with probability p."""
    return (torch.rand(shape, generator=gen) >= p).float() / (1.0 - p)


def drop_path(branch: torch.Tensor, p: float, gen) -> torch.Tensor:
    """Per example: the whole branch (B, ...) is zeroed with probability p, else scaled 1/(1-p)."""
    return branch * dropout_mask((branch.shape[0],) + (1,) * (branch.ndim - 1), p, gen).to(branch.dtype)


def dropconnect_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, p: float, gen) -> torch.Tensor:
    """x (B, I), w (O, I): every example gets its own mask on w (models/noise.py) -> (B, O)."""
    from .noise import hashed_keep   # numba: imported where a mask is drawn
    m = hashed_keep((x.shape[0],) + tuple(w.shape), p, gen).to(x.dtype)  # (B, O, I)
    return torch.einsum("bi,boi->bo", x, w * m) + b


class ModNet(Net1989):
    def __init__(self, seed: int = 0, act: str = "tanh", out_act: str = "tanh", dropout: float = 0.0,
                 norm: str = "none", groups: int = 4, blocks: int = 0, rezero: bool = False, ws: bool = False,
                 drop: float = 0.0, dropconnect: float = 0.0, spatial: float = 0.0, drop_path: float = 0.0):
        super().__init__(seed, act=act, out_act=out_act, dropout=dropout)
        self.norm, self.blocks, self.rezero, self.ws = norm, blocks, rezero, ws
        self.drop, self.dropconnect, self.spatial, self.drop_path_p = drop, dropconnect, spatial, drop_path
        self.gen, self.update_stats, self.bn_momentum = None, True, 0.1
        self.gain = act_gain(act) if ws else 1.0
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7)  # extras: a stream apart from init_params
        bound = 1.0 / math.sqrt(12 * 9)  # PyTorch's default conv init for the 3x3 block convs
        for i in range(blocks):
            for ab in "ab":
                self.register_parameter(f"b{i}{ab}_w", nn.Parameter((torch.rand(12, 12, 3, 3, generator=g) * 2 - 1)
                                                                    * bound))
                self.register_parameter(f"b{i}{ab}_b", nn.Parameter((torch.rand(12, generator=g) * 2 - 1) * bound))
            if rezero:
                self.register_parameter(f"b{i}_alpha", nn.Parameter(torch.zeros(())))
        self.sites = {"h1": 12, "h2": 12, "h3": 30, **{f"b{i}": 12 for i in range(blocks)}}
        if norm != "none":
            for s, c in self.sites.items():
                self.register_parameter(f"{s}_ng", nn.Parameter(torch.ones(c)))
                self.register_parameter(f"{s}_nb", nn.Parameter(torch.zeros(c)))
                if norm == "batch":
                    self.register_buffer(f"{s}_rm", torch.zeros(c))
                    self.register_buffer(f"{s}_rv", torch.ones(c))
        self.groups = groups

    def _norm(self, site: str, a: torch.Tensor) -> torch.Tensor:
        if self.norm == "none":
            return a
        w, b = getattr(self, f"{site}_ng"), getattr(self, f"{site}_nb")
        if self.norm == "batch":
            rm, rv = getattr(self, f"{site}_rm"), getattr(self, f"{site}_rv")
            if self.training and not self.update_stats:
                rm = rv = None  # batch statistics, running averages untouched
            return F.batch_norm(a, rm, rv, w, b, self.training, self.bn_momentum, 1e-5)
        groups = 1 if self.norm == "layer" else math.gcd(self.groups, a.shape[1])
        return F.group_norm(a, groups, w, b, 1e-5)

    def _w(self, name: str) -> torch.Tensor:
        w = getattr(self, name)
        return scaled_ws(w, self.gain) if self.ws else w

    def _noisy(self) -> bool:
        return self.training and self.gen is not None

    def h2_dense(self) -> torch.Tensor:
        h2 = self._w("h2_w")
        w = h2.new_zeros(12, 12, 5, 5)
        rows = torch.arange(12, device=w.device).unsqueeze(1).expand(12, 8)
        return w.index_put((rows, self.h2_index), h2)

    def forward(self, x, keep=None):  # x (B, 1, 16, 16); keep (B, 192) model.dropout mask from train()
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)                                   # (B, 1, 20, 20)
        x = self.act(self._norm("h1", F.conv2d(x, self._w("h1_w"), stride=2) + self.h1_b))  # (B, 12, 8, 8)
        if self.spatial > 0 and self._noisy():
            x = x * dropout_mask((x.shape[0], 12, 1, 1), self.spatial, self.gen).to(x.dtype)
        for i in range(self.blocks):
            h = F.conv2d(x, self._w(f"b{i}a_w"), getattr(self, f"b{i}a_b"), padding=1)
            h = F.conv2d(self.act(self._norm(f"b{i}", h)), self._w(f"b{i}b_w"), getattr(self, f"b{i}b_b"), padding=1)
            if self.drop_path_p > 0 and self._noisy():  # linear decay rule: block i of L drops with p (i+1)/L
                h = drop_path(h, self.drop_path_p * (i + 1) / self.blocks, self.gen)
            x = x + (getattr(self, f"b{i}_alpha") * h if self.rezero else h)
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)                                   # (B, 12, 12, 12)
        x = self.act(self._norm("h2", F.conv2d(x, self.h2_dense(), stride=2) + self.h2_b))  # (B, 12, 4, 4)
        x = x.flatten(1)                                                         # (B, 192)
        if keep is not None:
            x = x * keep.to(x.dtype) * (1.0 / (1.0 - self.dropout))
        if self.drop > 0 and self._noisy():
            x = x * dropout_mask(x.shape, self.drop, self.gen).to(x.dtype)
        w3 = self._w("h3_w")
        if self.dropconnect > 0 and self._noisy():
            a3 = dropconnect_linear(x, w3, self.h3_b, self.dropconnect, self.gen)
        else:
            a3 = x @ w3.t() + self.h3_b
        x = self.act(self._norm("h3", a3))                                       # (B, 30)
        x = x @ self.out_w.t() + self.out_b                                      # (B, 10)
        if self.out_act == "none":
            return x
        return activation(self.out_act)(x)

    def has_batchnorm(self) -> bool:
        return self.norm == "batch"


FINAL_PARAMS = ("out_w", "out_b", "head_w", "head_b")  # excluded from AGC (net1989/ModNet, ViT)
assert PARAM_NAMES[-2:] == FINAL_PARAMS[:2]
