"""Normalization, depth and number formats: methods that change the model or how it computes.

Norm and depth methods set keys of the ModNet spec (models/modnet.py, where the layer
maths is) at the build hook. Norm sites: after the H1 and H2 convolutions, the first
convolution of each residual block, and H3 (before the activation). Residual blocks sit
between H1 and H2 at 12x8x8.

Precision: fp32 (the default, stated) and bf16 autocast on the CPU. The switch gives the
engine a context manager for the forward pass (hook `forward`); weights, gradients,
optimizer state and the loss stay float32 (mixed precision: the matrix products and
convolutions run in bfloat16). Evaluation runs under the same context, so the evaluated
model is the one that was trained.
"""
import contextlib

import torch

from .gradients import agc_
from .registry import Method, Option, register


class Norm:
    kind = None

    def __init__(self, opts, **ctx):
        self.opts = opts

    def build(self, spec):
        spec["norm"] = self.kind
        if "groups" in self.opts:
            spec["groups"] = self.opts["groups"]


class BatchNorm(Norm):
    kind = "batch"


class LayerNorm(Norm):
    kind = "layer"


class GroupNorm(Norm):
    kind = "group"


class NoNorm(Norm):
    kind = "none"


class ResBlocks:
    def __init__(self, opts, **ctx):
        self.n = opts["n"]

    def build(self, spec):
        spec["blocks"] = self.n


class ReZero:
    def __init__(self, opts, **ctx):
        pass

    def build(self, spec):
        spec["rezero"] = True


class NormFree:
    def __init__(self, opts, **ctx):
        self.clip, self.eps = opts["clip"], opts["eps"]

    def build(self, spec):
        spec["ws"] = True

    def after_backward(self, ctx):
        agc_(ctx.views, ctx.gviews, self.clip, self.eps, skip=ctx.final_names, lead=1)


NORMS = ("batchnorm", "layernorm", "groupnorm")
_N = dict(kind="normalization", touches=("model",), hooks=("build", "forward"), modnet=True, slot="norm")

register(Method("batchnorm", impl="structure:BatchNorm", **_N,
                summary="BatchNorm at every norm site (batch statistics; running averages at evaluation)",
                what="Normalizes each channel (unit for H3) by the mean and variance over the batch and positions, "
                     "then a learned per-channel gain and bias; running averages (momentum 0.1) at evaluation. "
                     "SAM's second forward pass does not update them; SWA/EMA recompute them.",
                paper="Ioffe & Szegedy 2015", oracle="torch.nn.functional.batch_norm and nn.BatchNorm2d's running "
                "averages"))
register(Method("layernorm", impl="structure:LayerNorm", **_N,
                summary="LayerNorm at every norm site (per example over channels and positions)",
                what="Normalizes each example's whole feature map (all channels and positions; H3: its 30 "
                     "units), then a learned per-channel gain and bias: GroupNorm with one group.",
                paper="Ba, Kiros & Hinton 2016", oracle="torch.nn.LayerNorm over (C, H, W) followed by the "
                "per-channel affine"))
register(Method("groupnorm", impl="structure:GroupNorm", **_N,
                options={"groups": Option(4, "groups", "per norm site; gcd with the channel count", 1, 30)},
                summary="GroupNorm at every norm site (per example, channels in groups)",
                what="Normalizes each example over groups of channels and their positions, then a learned "
                     "per-channel gain and bias. Sites with a channel count the groups do not divide use "
                     "gcd(groups, channels) groups (12 channels: 4; H3's 30 units: 2).",
                paper="Wu & He 2018", oracle="torch.nn.GroupNorm"))
register(Method("nonorm", impl="structure:NoNorm", **_N, fast_model=("kernel", "fused"),
                summary="no normalization (the 1989 net's layers)",
                what="States the default explicitly: no normalization layer anywhere; with no other model "
                     "method the ModNet is exactly Net1989.",
                paper="LeCun et al. 1989", oracle="ModNet without options gives Net1989's outputs bit for bit"))
register(Method("resblocks", kind="depth", touches=("model",), hooks=("build", "forward"), modnet=True,
                impl="structure:ResBlocks", options={"n": Option(2, "blocks", "residual blocks", 1, 256)},
                summary="n residual blocks x + F(x) between H1 and H2 (3x3 convs, 12x8x8)",
                what="Inserts n pre-activation residual blocks at H1's resolution: x + conv(act(norm(conv(x)))) "
                     "with 12->12 3x3 convolutions (padding 1, PyTorch's default init). Each block adds 2,616 "
                     "parameters and 165,888 multiply-adds per image.",
                paper="He, Zhang, Ren & Sun 2016", oracle="the block written out with torch.nn.functional"))
register(Method("rezero", kind="depth", touches=("model",), hooks=("build", "forward"), modnet=True,
                impl="structure:ReZero", requires=("resblocks",),
                summary="ReZero: residual blocks x + a F(x), one scalar a per block, starting at 0",
                what="Every residual block's branch is multiplied by its own learned scalar a, initialized to 0, "
                     "so the net starts as the identity through the blocks. The paper uses it without "
                     "normalization; the pair with a norm method is allowed and measured.",
                paper="Bachlechner, Majumder, Mao, Cottrell & McAuley 2020, 'ReZero is All You Need'",
                oracle="at init the blocks are the identity; a's gradient equals <dL/dy, F(x)> by autograd"))
register(Method("nf", kind="normalization", touches=("model", "gradients"), hooks=("build", "after_backward"),
                # the kernel path computes the standardization too; not the fused products: their
                # padding sums lose digits on standardized weights (7e-5 of the gradient against
                # autograd, the kernels 3e-7: tests/test_population.py)
                modnet=True, fast_model=("kernel",), impl="structure:NormFree",
                options={"clip": Option(0.01, "ratio ||g||/||w||", "AGC lambda", 0.0, 100.0),
                         "eps": Option(1e-3, "weight norm floor", "AGC eps", 0.0, 1.0)},
                incompatible_with={**{n: "a normalizer-free net has no normalization layers" for n in NORMS},
                                   "agc": "nf already clips with AGC (set nf:clip=...)"},
                summary="normalizer-free: scaled weight standardization + AGC",
                what="Every conv and H3 weight is used as gamma (W - mean) / (std sqrt(fan_in)) per output unit "
                     "(gamma = 1/std of the activation of a unit Gaussian: 1.7129 for ReLU), and gradients are "
                     "clipped with AGC (final layer excluded). No normalization layers.",
                paper="Brock, De & Smith 2021 (NF-ResNets); Brock, De, Smith & Simonyan 2021 (NFNets, AGC)",
                oracle="the standardized weight has zero mean and variance gamma^2/fan_in per unit; AGC as agc"))


class FP32:
    def __init__(self, opts, **ctx):
        pass

    def forward_context(self):
        return contextlib.nullcontext()


class BF16(FP32):
    def forward_context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


_P = dict(kind="precision", touches=("model",), hooks=("forward",), slot="precision", options={})

register(Method("fp32", impl="structure:FP32", **_P, summary="float32 everywhere (the default, stated)",
                what="All arithmetic in IEEE float32: weights, activations, gradients, optimizer state.",
                paper="-", oracle="the run without any precision method: bit-identical weights"))
register(Method("bf16", impl="structure:BF16", autograd=True, **_P,
                summary="bfloat16 autocast on the CPU for the forward pass; float32 weights and optimizer",
                what="The forward pass runs under torch.autocast('cpu', bfloat16): convolutions and matrix "
                     "products in bfloat16 (8-bit mantissa), reductions and the loss in float32; weights, "
                     "gradients and optimizer state stay float32. Speed depends on the CPU's bf16 support.",
                paper="Kalamkar et al. 2019, 'A Study of BFLOAT16 for Deep Learning Training'",
                oracle="the forward under torch.autocast by hand: same loss; within 2% of the float32 loss"))
