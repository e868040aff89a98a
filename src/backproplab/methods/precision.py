"""Number formats: fp32 (the default, stated) and bf16 autocast on the CPU.

The switch gives the engine a context manager for the forward pass (hook `forward`);
weights, gradients, optimizer state and the loss stay float32 (mixed precision: the
matrix products and convolutions run in bfloat16). Evaluation runs under the same
context, so the evaluated model is the one that was trained.
"""
import contextlib

import torch

from .registry import Method, register


class FP32:
    def __init__(self, opts, **ctx):
        pass

    def forward_context(self):
        return contextlib.nullcontext()


class BF16(FP32):
    def forward_context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


_P = dict(kind="precision", touches=("model",), hooks=("forward",), slot="precision", options={})

register(Method("fp32", impl="precision:FP32", **_P, summary="float32 everywhere (the default, stated)",
                what="All arithmetic in IEEE float32: weights, activations, gradients, optimizer state.",
                paper="-", oracle="the run without any precision method: bit-identical weights"))
register(Method("bf16", impl="precision:BF16", **_P,
                summary="bfloat16 autocast on the CPU for the forward pass; float32 weights and optimizer",
                what="The forward pass runs under torch.autocast('cpu', bfloat16): convolutions and matrix "
                     "products in bfloat16 (8-bit mantissa), reductions and the loss in float32; weights, "
                     "gradients and optimizer state stay float32. Speed depends on the CPU's bf16 support.",
                paper="Kalamkar et al. 2019, 'A Study of BFLOAT16 for Deep Learning Training'",
                oracle="the forward under torch.autocast by hand: same loss; within 2% of the float32 loss"))
