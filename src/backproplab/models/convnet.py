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

Block types (model.block; MobileNet v1 and v2, Howard et al. 2017, Sandler et al. 2018). The
first layer stays a full 5x5 convolution (it reads one channel: there is nothing to separate);
c2 and the extra layers become:
  plain              the convolution above, ReLU
  separable          depthwise k x k (one filter per channel, same stride), ReLU;
                     pointwise 1x1 (cin -> cout), ReLU
  inverted_residual  expand 1x1 (cin -> EXPAND cin), ReLU; depthwise k x k, ReLU; project 1x1
                     (-> cout), linear (no ReLU: the "linear bottleneck"); an extra layer (same
                     shape in and out) adds its input back (the residual)
Width: `width` sets w = 4 * width (default: w = 4 * size); resolution: the side of the input
(16, 20 or 28: data/preprocess.py resizes the 28x28 sources to any side), which sets the
output sides 8/4 (16), 10/5 (20), 14/7 (28) and the head's input 2 w side^2.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

SIDE = 16            # input (B, 1, 16, 16) in [-1, 1]
MAX_SIZE = 64
BLOCKS = ("plain", "separable", "inverted_residual")
EXPAND = 4           # inverted residuals: hidden channels = EXPAND x input channels
RESOLUTIONS = (16, 20, 28)


def shape(size: int) -> tuple[int, int]:
    """(width w, number of extra 3x3 layers) of a family member."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
        raise UserError(f"convnet size must be an integer from 1 to {MAX_SIZE}, not {size!r}")
    return 4 * size, (size - 1) // 2


def _sides(resolution: int) -> tuple[int, int]:
    """Output sides of c1 and c2 (both 5x5, stride 2, padding 2) for an input side."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or not 8 <= resolution <= 64:
        raise UserError(f"convnet resolution must be an integer from 8 to 64 pixels, not {resolution!r}")
    s1 = (resolution - 1) // 2 + 1
    return s1, (s1 - 1) // 2 + 1


def _block(name, cin, cout, k, side, stride, block, residual=False, side_in=None) -> list[dict]:
    """The layers one convolution of the plain net becomes in a block type."""
    pad = k // 2
    if block == "plain":
        return [dict(name=name, cin=cin, cout=cout, k=k, side=side, stride=stride, pad=pad, groups=1, relu=True)]
    if block == "separable":
        return [dict(name=f"{name}_dw", cin=cin, cout=cin, k=k, side=side, stride=stride, pad=pad, groups=cin,
                     relu=True),
                dict(name=f"{name}_pw", cin=cin, cout=cout, k=1, side=side, stride=1, pad=0, groups=1, relu=True)]
    if block == "inverted_residual":
        h = EXPAND * cin
        return [dict(name=f"{name}_ex", cin=cin, cout=h, k=1, side=side_in or side, stride=1, pad=0, groups=1,
                     relu=True, block_in=residual),
                dict(name=f"{name}_dw", cin=h, cout=h, k=k, side=side, stride=stride, pad=pad, groups=h, relu=True),
                dict(name=f"{name}_pj", cin=h, cout=cout, k=1, side=side, stride=1, pad=0, groups=1, relu=False,
                     block_out=residual)]
    raise UserError(f"unknown convnet block {block!r}; choose {', '.join(BLOCKS)}")


def layer_specs(size: int, block: str = "plain", width: int | None = None, resolution: int = SIDE) -> list[dict]:
    """Every weight layer in order: name, in/out channels, kernel, output side (pixels), stride,
    padding, groups, whether ReLU follows; block_in / block_out mark a residual's ends."""
    w, extra = shape(size)
    if width is not None and width != 0:
        w = shape(width)[0]
    s1, s2 = _sides(resolution)
    specs = [dict(name="c1", cin=1, cout=w, k=5, side=s1, stride=2, pad=2, groups=1, relu=True)]
    specs += _block("c2", w, 2 * w, 5, s2, 2, block, side_in=s1)
    for i in range(extra):
        specs += _block(f"c{3 + i}", 2 * w, 2 * w, 3, s2, 1, block, residual=True)
    specs.append(dict(name="head", cin=2 * w * s2 * s2, cout=10, k=1, side=1, stride=1, pad=0, groups=1,
                      relu=False))
    return specs


def _spec_params(s) -> int:
    return s["cin"] // s["groups"] * s["cout"] * s["k"] ** 2 + s["cout"]


def conv_params(size: int, block: str = "plain", width: int | None = None, resolution: int = SIDE) -> int:
    return sum(_spec_params(s) for s in layer_specs(size, block, width, resolution))


def layer_macs(size: int, block: str = "plain", width: int | None = None, resolution: int = SIDE) -> dict:
    """Multiply-adds per image of each weight layer (bias adds, ReLU and residual adds not counted)."""
    return {s["name"]: s["side"] ** 2 * s["cout"] * (s["cin"] // s["groups"]) * s["k"] ** 2
            for s in layer_specs(size, block, width, resolution)}


def conv_macs(size: int, block: str = "plain", width: int | None = None, resolution: int = SIDE) -> int:
    return sum(layer_macs(size, block, width, resolution).values())


class ConvNet(nn.Module):
    def __init__(self, seed: int = 0, size: int = 2, dropout: float = 0.0, block: str = "plain",
                 width: int | None = None, resolution: int = SIDE):
        super().__init__()
        self.size, self.dropout, self.block, self.resolution = size, dropout, block, resolution
        self.specs = layer_specs(size, block, width, resolution)
        self.dropout_units = self.specs[-1]["cin"]
        for s in self.specs:
            shp = (s["cout"], s["cin"]) if s["name"] == "head" else (s["cout"], s["cin"] // s["groups"], s["k"], s["k"])
            setattr(self, f"{s['name']}_w", nn.Parameter(torch.empty(shp)))
            setattr(self, f"{s['name']}_b", nn.Parameter(torch.zeros(s["cout"])))
        self._init(seed)

    @torch.no_grad()
    def _init(self, seed):
        # He-uniform (bound sqrt(6 / fan_in)) for the ReLU layers, 1/sqrt(fan_in) for the
        # head (logits start near 0) and the linear projections of inverted residuals (unit
        # variance gain); biases 0; drawn in layer order from one generator.
        g = torch.Generator().manual_seed(int(seed))
        for s in self.specs:
            p = getattr(self, f"{s['name']}_w")
            fan_in = s["cin"] // s["groups"] * s["k"] ** 2
            bound = (math.sqrt(6.0) if s["relu"] else 1.0) / math.sqrt(fan_in)
            if not s["relu"] and s["name"] != "head":
                bound = math.sqrt(3.0) / math.sqrt(fan_in)
            p.copy_((torch.rand(p.shape, generator=g) * 2.0 - 1.0) * bound)

    def forward(self, x, keep=None):  # x (B, 1, r, r); keep (B, 2 w side^2) dropout mask or None
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)                            # blank paper around the digit
        x = F.relu(F.conv2d(x, self.c1_w, self.c1_b, stride=2))           # (B, w, s1, s1)
        skip = None
        for s in self.specs[1:-1]:
            if s.get("block_in"):
                skip = x
            x = F.conv2d(x, getattr(self, f"{s['name']}_w"), getattr(self, f"{s['name']}_b"), stride=s["stride"],
                         padding=s["pad"], groups=s["groups"])
            if s["relu"]:
                x = F.relu(x)
            if s.get("block_out"):
                x = x + skip
        x = x.flatten(1)                                                  # (B, 2 w s2^2)
        if keep is not None:  # the caller's mask: shared random stream, exact resume
            x = x * keep.to(x.dtype) * (1.0 / (1.0 - self.dropout))
        elif self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return F.linear(x, self.head_w, self.head_b)                      # (B, 10) logits


class _Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def torch_layers(net: ConvNet) -> nn.Module:
    """The same network composed from torch.nn layers (Conv2d with groups, ReLU, Linear), weights
    copied: the reference the tests compare forward passes with, and the form PT2E quantizes."""
    layers, run = [nn.ConstantPad2d(2, -1.0)], None

    def conv(s):
        c = nn.Conv2d(s["cin"], s["cout"], s["k"], stride=s["stride"], padding=s["pad"] if s["name"] != "c1" else 0,
                      groups=s["groups"])
        with torch.no_grad():
            c.weight.copy_(getattr(net, f"{s['name']}_w"))
            c.bias.copy_(getattr(net, f"{s['name']}_b"))
        return [c] + ([nn.ReLU()] if s["relu"] else [])

    for s in net.specs[:-1]:
        if s.get("block_in"):
            run = []
        (layers if run is None else run).extend(conv(s))
        if s.get("block_out"):
            layers.append(_Residual(nn.Sequential(*run)))
            run = None
    head = nn.Linear(net.specs[-1]["cin"], 10)
    with torch.no_grad():
        head.weight.copy_(net.head_w)
        head.bias.copy_(net.head_b)
    return nn.Sequential(*layers, nn.Flatten(), head)
