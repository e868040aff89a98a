"""LeCun et al. 1989's zip-code net, exactly as SPEC section 1 describes it.

Parameters, in the fixed order every engine, checkpoint and hash uses:
  h1_w (12,1,5,5)  h1_b (12,8,8)    1,068
  h2_w (12,8,5,5)  h2_b (12,4,4)    2,592   each output plane sees 8 of 12 inputs
  h3_w (30,192)    h3_b (30,)       5,790
  out_w (10,30)    out_b (10,)        310   out_b starts at -1
"""
import hashlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PARAM_NAMES = ("h1_w", "h1_b", "h2_w", "h2_b", "h3_w", "h3_b", "out_w", "out_b")
PARAM_SHAPES = {
    "h1_w": (12, 1, 5, 5), "h1_b": (12, 8, 8),
    "h2_w": (12, 8, 5, 5), "h2_b": (12, 4, 4),
    "h3_w": (30, 192), "h3_b": (30,),
    "out_w": (10, 30), "out_b": (10,),
}
LAYER_PARAMS = {"H1": 1068, "H2": 2592, "H3": 5790, "out": 310}
N_PARAMS = 9760
# Multiply-adds of one forward pass: 12*8*8*25 + 12*4*4*200 + 192*30 + 30*10.
MACS = 12 * 64 * 25 + 12 * 16 * 200 + 192 * 30 + 30 * 10
ACTIVATIONS = 12 * 64 + 12 * 16 + 30 + 10  # hidden and output units
# The paper's connection table for H2: output plane o sees input planes H2_TABLE[o].
H2_TABLE = np.array([list(range(0, 8))] * 4 + [list(range(4, 12))] * 4
                    + [[0, 1, 2, 3, 8, 9, 10, 11]] * 4, dtype=np.int64)  # (12, 8)
FAN_IN = {"h1_w": 25, "h2_w": 200, "h3_w": 192, "out_w": 30}

assert MACS == 63_660 and ACTIVATIONS == 1_000
assert sum(int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES[0:2]) == LAYER_PARAMS["H1"]
assert sum(int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES[2:4]) == LAYER_PARAMS["H2"]
assert sum(int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES[4:6]) == LAYER_PARAMS["H3"]
assert sum(int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES[6:8]) == LAYER_PARAMS["out"]
assert sum(LAYER_PARAMS.values()) == N_PARAMS


def init_params(seed: int) -> dict:
    """The 1989 init: weights uniform in +-2.4/sqrt(fan_in), biases 0, out_b -1.

    Drawn from a torch.Generator in PARAM_NAMES order, so every engine starts from the
    same numbers for the same seed.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name in PARAM_NAMES:
        shape = PARAM_SHAPES[name]
        if name in FAN_IN:
            bound = 2.4 / math.sqrt(FAN_IN[name])
            out[name] = (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound
        elif name == "out_b":
            out[name] = torch.full(shape, -1.0)
        else:
            out[name] = torch.zeros(shape)
    return out


def weights_sha256(params: dict) -> str:
    """SHA-256 of the float32 bytes of the parameters in the dict's order (PARAM_NAMES for Net1989)."""
    h = hashlib.sha256()
    for name in params:
        t = params[name]
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def activation(name: str):
    if name == "tanh":
        return torch.tanh
    if name == "relu":
        return F.relu
    if name == "scaled_tanh":  # LeCun's 1.7159 * tanh(2x/3)
        return lambda x: 1.7159 * torch.tanh(x * (2.0 / 3.0))
    raise ValueError(f"unknown activation {name!r}")


class Net1989(nn.Module):
    """act: hidden nonlinearity; out_act: 'tanh' (1989) or 'none' (logits); dropout before H3."""

    def __init__(self, seed: int = 0, act: str = "tanh", out_act: str = "tanh", dropout: float = 0.0):
        super().__init__()
        for name, t in init_params(seed).items():
            setattr(self, name, nn.Parameter(t))
        self.act_name, self.out_act, self.dropout = act, out_act, dropout
        self.act = activation(act)
        self.register_buffer("h2_index", torch.from_numpy(H2_TABLE), persistent=False)

    def params(self) -> dict:
        return {n: getattr(self, n) for n in PARAM_NAMES}

    def h2_dense(self) -> torch.Tensor:
        """(12, 12, 5, 5) weight with zeros where the connection table has no link."""
        w = self.h2_w.new_zeros(12, 12, 5, 5)
        rows = torch.arange(12, device=w.device).unsqueeze(1).expand(12, 8)
        return w.index_put((rows, self.h2_index), self.h2_w)

    def forward(self, x, keep=None):  # x (B, 1, 16, 16) in [-1, 1]; keep (B, 192) dropout mask
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)                       # (B, 1, 20, 20)
        x = self.act(F.conv2d(x, self.h1_w, stride=2) + self.h1_b)   # (B, 12, 8, 8)
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)                       # (B, 12, 12, 12)
        x = self.act(F.conv2d(x, self.h2_dense(), stride=2) + self.h2_b)  # (B, 12, 4, 4)
        x = x.flatten(1)                                             # (B, 192)
        if keep is not None:  # the caller's mask: the engines share one random stream
            x = x * keep.to(x.dtype) * (1.0 / (1.0 - self.dropout))
        elif self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        x = self.act(x @ self.h3_w.t() + self.h3_b)                  # (B, 30)
        x = x @ self.out_w.t() + self.out_b                          # (B, 10)
        if self.out_act == "none":
            return x
        return activation(self.out_act)(x)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
