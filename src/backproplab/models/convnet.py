"""The scalable convnet family (issue 5): width and depth from one integer, `size`.

  width w = 4 * size, extra = (size - 1) // 2
  c1: pad 2 with -1 (blank paper), 5x5 conv stride 2, 1 -> w         (B, w, 8, 8)
  c2: pad 2 with 0, 5x5 conv stride 2, w -> 2w                       (B, 2w, 4, 4)
  extra x [3x3 conv pad 1, 2w -> 2w]                                  (B, 2w, 4, 4)
  flatten (32 w features), dropout there, linear -> 10 logits
  ReLU after every conv; one bias per channel.

The 1989 net sits inside the range: size 2 does 66,560 multiply-adds per image (the 1989
net: 63,660) with 5,994 parameters, size 3 has 16,594 parameters (1989: 9,760).

Parameters and multiply-adds are counted analytically here (conv_params, conv_macs) and
training FLOPs per example in scaling/flops.py; tests check both against the modules and
torch.utils.flop_counter.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

SIDE = 16            # input (B, 1, 16, 16) in [-1, 1]
MAX_SIZE = 64


def shape(size: int) -> tuple[int, int]:
    """(width w, number of extra 3x3 layers) of a family member."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
        raise UserError(f"convnet size must be an integer from 1 to {MAX_SIZE}, not {size!r}")
    return 4 * size, (size - 1) // 2


def layer_specs(size: int) -> list[dict]:
    """Every weight layer in order: name, in/out channels, kernel, output side (pixels)."""
    w, extra = shape(size)
    specs = [{"name": "c1", "cin": 1, "cout": w, "k": 5, "side": 8},
             {"name": "c2", "cin": w, "cout": 2 * w, "k": 5, "side": 4}]
    specs += [{"name": f"c{3 + i}", "cin": 2 * w, "cout": 2 * w, "k": 3, "side": 4} for i in range(extra)]
    specs.append({"name": "head", "cin": 2 * w * 16, "cout": 10, "k": 1, "side": 1})
    return specs


def conv_params(size: int) -> int:
    return sum(s["cin"] * s["cout"] * s["k"] ** 2 + s["cout"] for s in layer_specs(size))


def layer_macs(size: int) -> dict:
    """Multiply-adds per image of each weight layer (bias adds and ReLU not counted)."""
    return {s["name"]: s["side"] ** 2 * s["cout"] * s["cin"] * s["k"] ** 2 for s in layer_specs(size)}


def conv_macs(size: int) -> int:
    return sum(layer_macs(size).values())


class ConvNet(nn.Module):
    def __init__(self, seed: int = 0, size: int = 2, dropout: float = 0.0):
        super().__init__()
        self.size, self.dropout = size, dropout
        self.specs = layer_specs(size)
        self.dropout_units = self.specs[-1]["cin"]
        for s in self.specs:
            shp = (s["cout"], s["cin"]) if s["name"] == "head" else (s["cout"], s["cin"], s["k"], s["k"])
            setattr(self, f"{s['name']}_w", nn.Parameter(torch.empty(shp)))
            setattr(self, f"{s['name']}_b", nn.Parameter(torch.zeros(s["cout"])))
        self._init(seed)

    @torch.no_grad()
    def _init(self, seed):
        # He-uniform (bound sqrt(6 / fan_in)) for the ReLU layers, 1/sqrt(fan_in) for the
        # head (logits start near 0); biases 0; drawn in layer order from one generator.
        g = torch.Generator().manual_seed(int(seed))
        for s in self.specs:
            p = getattr(self, f"{s['name']}_w")
            fan_in = s["cin"] * s["k"] ** 2
            bound = (1.0 if s["name"] == "head" else math.sqrt(6.0)) / math.sqrt(fan_in)
            p.copy_((torch.rand(p.shape, generator=g) * 2.0 - 1.0) * bound)

    def forward(self, x, keep=None):  # x (B, 1, 16, 16); keep (B, 32 w) dropout mask or None
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)                            # (B, 1, 20, 20)
        x = F.relu(F.conv2d(x, self.c1_w, self.c1_b, stride=2))           # (B, w, 8, 8)
        x = F.relu(F.conv2d(x, self.c2_w, self.c2_b, stride=2, padding=2))  # (B, 2w, 4, 4)
        for s in self.specs[2:-1]:
            x = F.relu(F.conv2d(x, getattr(self, f"{s['name']}_w"), getattr(self, f"{s['name']}_b"), padding=1))
        x = x.flatten(1)                                                  # (B, 32 w)
        if keep is not None:  # the caller's mask: shared random stream, exact resume
            x = x * keep.to(x.dtype) * (1.0 / (1.0 - self.dropout))
        elif self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return F.linear(x, self.head_w, self.head_b)                      # (B, 10) logits
