"""Quantization-aware training, registered after every other family so that no earlier method's
rank (which keys its random streams) moves.

qat  fake-quantizes the convolution and linear weights (every parameter named *_w or *weight with
     at least two axes per replica: Net1989's h1_w, h2_w, h3_w, out_w, the convnet family's *_w,
     torch.nn layers' .weight; biases, per-unit biases and normalization gains stay float) per
     output channel (axis 0), symmetric, to `bits` bits, at the engine's forward_weights hook:
     the forward and backward passes of a step see Q(w) and the gradient taken there is applied
     to the float weights w (the straight-through estimator: dQ/dw = 1). Q is the scheme of the
     PT2E x86 quantizer's weights (experiments/quantize.py: PerChannelMinMaxObserver, int8 in
     [-128, 127], per_channel_symmetric, eps 2^-12), so `backproplab quantize` of a run trained
     with it stores exactly the weights the run trained at:
       s_c = max(max_i |w_ci| / ((qmax - qmin) / 2), 2^-12),  qmin = -2^(bits-1), qmax = 2^(bits-1) - 1
       Q(w)_ci = clamp(round(w_ci * (1 / s_c)), qmin, qmax) * s_c      (round half to even)
     (for 8 bits s_c = max|w_c| / 127.5: the largest weight lands on 127.5, rounded to 128 and
     clamped to 127 when positive, -128 when negative). Activations stay float during training.
"""
import numba
import numpy as np
import torch

from ..errors import UserError
from .registry import Method, Option, register

EPS = 2.0 ** -12   # the x86 quantizer's scale floor (get_default_x86_inductor_quantization_config)


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def channel_scale(w: torch.Tensor, bits: int = 8, lead: int = 1) -> torch.Tensor:
    """w (*lead axes, out, ...) -> (*lead axes, out): max |w| of each output channel over the
    quantization range's half width, floored at EPS (float32, as the observer computes it)."""
    qmin, qmax = qrange(bits)
    amax = w.detach().abs().flatten(lead + 1).amax(-1)
    return torch.clamp(amax / (float(qmax - qmin) / 2), min=EPS)


def fake_quantize(w: torch.Tensor, bits: int = 8, lead: int = 1) -> torch.Tensor:
    """Q(w) per output channel (the axis after `lead` replica axes), symmetric, zero point 0."""
    qmin, qmax = qrange(bits)
    s = channel_scale(w, bits, lead)
    s = s.view(*s.shape, *([1] * (w.ndim - lead - 1)))
    return torch.clamp(torch.round(w * (1.0 / s)), qmin, qmax) * s


@numba.njit(cache=True)
def _fake_quantize_rows(w, starts, lengths, qmin, qmax, eps):
    """In place on w (R, P) float32: each segment [start, start + length) of every row is one output
    channel; the same float32 operations, in the same order, as fake_quantize."""
    half = (qmax - qmin) / np.float32(2.0)
    one = np.float32(1.0)
    for r in range(w.shape[0]):
        for c in range(starts.shape[0]):
            a, b = starts[c], starts[c] + lengths[c]
            m = np.float32(0.0)
            for i in range(a, b):
                m = max(m, abs(w[r, i]))
            s = max(m / half, eps)
            inv = one / s
            for i in range(a, b):
                w[r, i] = min(max(np.rint(w[r, i] * inv), qmin), qmax) * s


def channel_segments(ctx, names) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) in W's columns of every output channel of the parameters `names`: a
    (out, ...) parameter's channel is a contiguous run of its columns."""
    starts, lengths, a = [], [], 0
    for n in ctx.param_names:
        shp = tuple(ctx.views[n].shape[1:])
        size = int(np.prod(shp))
        if n in names:
            k = size // shp[0]
            starts += range(a, a + size, k)
            lengths += [k] * shp[0]
        a += size
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


def quantized_names(ctx) -> list:
    """The parameters QAT quantizes: the convolution and linear weights of the population's model."""
    return [n for n in ctx.param_names if n.endswith(("_w", "weight")) and ctx.views[n].ndim >= 3]


class QAT:
    def __init__(self, opts, **ctx):
        self.bits, self.start = opts["bits"], opts["start"]
        self.names = None

    def active(self, ctx) -> bool:
        return ctx.step >= self.start * ctx.total_steps

    @torch.no_grad()
    def forward_weights(self, ctx):
        """(R, P) weights with the conv / linear weights fake-quantized, or None before `start`."""
        if not self.active(ctx):
            return None
        if self.names is None:
            self.names = quantized_names(ctx)
            if not self.names:
                raise UserError(f"method qat: model.name={ctx.cfg.model.name} has no convolution or linear "
                                f"weights to quantize")
            self.segments = channel_segments(ctx, self.names)
        w = ctx.w.clone()
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():  # one compiled loop
            qmin, qmax = qrange(self.bits)
            _fake_quantize_rows(w.numpy(), *self.segments, np.float32(qmin), np.float32(qmax), np.float32(EPS))
            return w
        views = ctx.views_of(w)
        for n in self.names:
            views[n].copy_(fake_quantize(views[n], self.bits))
        return w


def _check(cfg, opts):
    if opts["start"] >= 1.0:
        return f"start={opts['start']} never turns fake quantization on: it must be below 1 (a fraction of the run)"
    return None


register(Method(
    "qat", kind="compression", touches=("gradients",), hooks=("forward",), impl="qat:QAT", check=_check,
    summary="quantization-aware training: forward and backward at per-channel int8 fake-quantized weights (STE)",
    options={"bits": Option(8, "bits", "signed integer range [-2^(bits-1), 2^(bits-1) - 1]", 2, 8),
             "start": Option(0.0, "fraction of the run's steps", "fake quantization from step start * T on",
                             0.0, 1.0)},
    what="Each step's forward and backward passes run at Q(w): every convolution and linear weight "
         "(Net1989's h1_w, h2_w, h3_w, out_w) quantized per output channel, symmetric, zero point 0, "
         "scale s = max|w| / ((qmax - qmin) / 2) (max|w| / 127.5 at 8 bits, floored at 2^-12), "
         "Q(w) = clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1) s: the scheme of the PT2E x86 "
         "quantizer's weights, so `backproplab quantize` of the run stores exactly these weights. The "
         "gradient at Q(w) updates the float weights w (straight-through estimator); biases stay float, "
         "activations float. From step start * T on (T the run's steps). Evaluation and the stored "
         "weights are the float ones: `backproplab quantize DIR` gives the int8 net's error.",
    interactions="composes with every method: SAM's second gradient is taken at Q(w + e); AGC clips and "
                 "pruning masks the gradient taken at Q(w); averages (SWA, EMA) average the float weights.",
    paper="Jacob et al. 2018, 'Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-"
          "Only Inference' (CVPR); Krishnamoorthi 2018, 'Quantizing deep convolutional networks for "
          "efficient inference: A whitepaper' (per-channel weights, QAT)",
    oracle="torch.fake_quantize_per_channel_affine and the PT2E-converted int8 weights; one step against a "
           "hand-written STE step, on the kernel and autograd paths (tests/test_qat.py)"))
