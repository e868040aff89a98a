"""The stacked forward's H2 convolution with its input gradient as a product and a numba scatter.

H2 is a grouped 5x5, stride-2 convolution (R groups of 12 -> 12 planes, 8x8 -> 4x4, zero
padding 2) over channels-last tensors. oneDNN's forward and weight gradient for it are good
(0.9 and 0.7 ms at R = 8, batch 32, one thread); its input gradient, a stride-2 transposed
convolution, took 2.35 ms, and F.conv_transpose2d and the unfold/fold formulation were no
faster (2.4 and 9.8 ms). Written out, the input gradient is one batched product and a
column-to-image sum:

    cols[r, (b, oy, ox), (ky, kx, i)] = sum_o go[b, r * 12 + o, oy, ox] * w[r * 12 + o, i, ky, kx]
    gx[b, r * 12 + i, 2 oy + ky - 2, 2 ox + kx - 2] += cols[r, (b, oy, ox), (ky, kx, i)]

The product is MKL's bmm on the channels-last gradient as it lies (0.64 ms), the sum the
loop below (0.32 ms) straight into a channels-last result: 1.0 ms against 2.35. The sum runs
in another order than oneDNN's, so the result agrees to float rounding (tests/test_stacked.py
compares the stacked forward's gradients with R separate modules' under autograd).
"""
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit


@njit(cache=True)
def col2im_into(cols, out, n, k, stride, pad):
    """cols (R, B * n * n, k * k * C) float32 (n x n outputs), rows (b, oy, ox), columns (ky, kx, c); out (B, side,
    side, R * C) float32, zeroed: out[b, oy * stride + ky - pad, ox * stride + kx - pad, r * C + c]
    += cols[r, (b, oy, ox), (ky, kx, c)], taps that fall in the padding dropped."""
    R, KC = cols.shape[0], cols.shape[2]
    B, side, C = out.shape[0], out.shape[1], KC // (k * k)
    for b in range(B):
        for r in range(R):
            for oy in range(n):
                for ox in range(n):
                    m = (b * n + oy) * n + ox
                    for ky in range(k):
                        y = oy * stride + ky - pad
                        if y < 0 or y >= side:
                            continue
                        for kx in range(k):
                            x = ox * stride + kx - pad
                            if x < 0 or x >= side:
                                continue
                            t = (ky * k + kx) * C
                            for c in range(C):
                                out[b, y, x, r * C + c] += cols[r, m, t + c]


@njit(cache=True)
def h1_cols(x, cols):
    """x (R or 1, B, 16, 16) float32 (each replica's images, or one batch shared); cols (R, B * 64, 25):
    cols[r, (b, oy, ox), ky * 5 + kx] = x[r, b, 2 oy + ky - 2, 2 ox + kx - 2], -1 outside the image
    (H1's 5x5, stride-2 windows over the -1 border of 2)."""
    R, B = cols.shape[0], x.shape[1]
    for r in range(R):
        xr = x[r] if x.shape[0] > 1 else x[0]
        for b in range(B):
            for oy in range(8):
                for ox in range(8):
                    m = (b * 8 + oy) * 8 + ox
                    for ky in range(5):
                        y = 2 * oy + ky - 2
                        for kx in range(5):
                            v = 2 * ox + kx - 2
                            cols[r, m, ky * 5 + kx] = xr[b, y, v] if (0 <= y < 16 and 0 <= v < 16) else -1.0


class H1Conv(torch.autograd.Function):
    """H1 of R replicas: x (R or 1, B, 16, 16) -> (B, R * 12, 8, 8) channels-last, w (R * 12, 1, 5, 5);
    the windows gathered by h1_cols, then one batched product forward (0.55 ms at R = 8, batch 32,
    against 0.83 for the -1 padded copy and oneDNN's grouped convolution) and one for the weight
    gradient (0.27 against 0.33). The input needs no gradient (it is data)."""

    @staticmethod
    def forward(ctx, x, w, R):
        B = x.shape[1]
        cols = torch.empty(R, B * 64, 25)
        h1_cols(x.contiguous().numpy(), cols.numpy())
        ctx.save_for_backward(cols)
        ctx.R = R
        h = torch.bmm(cols, w.reshape(R, 12, 25).transpose(1, 2))                   # (R, B 64, 12)
        return h.transpose(0, 1).contiguous().view(B, 8, 8, R * 12).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, go):
        cols, = ctx.saved_tensors
        R, B = ctx.R, go.shape[0]
        g = go.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(B * 64, R, 12)
        gw = torch.bmm(g.transpose(0, 1).transpose(1, 2), cols)                     # (R, 12, 25)
        return None, gw.reshape(R * 12, 1, 5, 5), None


def h1_conv(x, w, R, products=True):
    """H1's convolution of R replicas over the -1 border: x (R or 1, B, 16, 16), w (R * 12, 1, 5, 5)
    -> (B, R * 12, 8, 8) channels-last. H1Conv on CPU float32 outside autocast when `products`,
    else the padded copy and F.conv2d. The stacked forward passes products=False for standardized
    weights (nf): a blank window's sum of them is 0 up to rounding, on ReLU's kink, and the
    products round it to the other side of 0 than the kernels do (the padded convolution agrees
    with them: tests/test_population.py, sam + nf, 0.02 relative off after two passes)."""
    if (products and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not x.requires_grad and not torch.is_autocast_enabled("cpu")):
        return H1Conv.apply(x.detach(), w, R)
    B = x.shape[1]
    xg = x.transpose(0, 1).expand(B, R, 16, 16)
    xg = F.pad(xg, (2, 2, 2, 2), value=-1.0).contiguous(memory_format=torch.channels_last)   # (B, R, 20, 20)
    return F.conv2d(xg, w, stride=2, groups=R)


class GroupedConv(torch.autograd.Function):
    """F.conv2d(x, w, stride, padding, groups=R) on channels-last float32 CPU tensors, x (B, R * C,
    side, side), w (R * O, C, k, k); the backward's input gradient as a product and col2im_into,
    the weight gradient oneDNN's."""

    @staticmethod
    def forward(ctx, x, w, R, stride, pad):
        ctx.save_for_backward(x, w)
        ctx.conf = (R, stride, pad)
        return F.conv2d(x, w, stride=stride, padding=pad, groups=R)

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        R, stride, pad = ctx.conf
        B, RC, side = x.shape[0], x.shape[1], x.shape[2]
        C, k, O = w.shape[1], w.shape[2], w.shape[0] // R
        n = go.shape[2]
        go = go.contiguous(memory_format=torch.channels_last)
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(go, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False,
                                                     [0, 0], R, [False, True, False])[1]
        if ctx.needs_input_grad[0]:
            wt = w.reshape(R, O, C, k * k).transpose(2, 3).reshape(R, O, k * k * C)     # (r, o, (tap, c))
            g = go.permute(0, 2, 3, 1).reshape(B * n * n, R, O).transpose(0, 1)       # (R, B n n, O), a view
            cols = torch.bmm(g, wt)
            out = np.zeros((B, side, side, RC), np.float32)
            col2im_into(cols.numpy(), out, n, k, stride, pad)
            gx = torch.from_numpy(out).permute(0, 3, 1, 2)                            # channels-last (B, RC, s, s)
        return gx, gw, None, None, None


def grouped_conv(x, w, R, stride, pad):
    """The grouped convolution, through GroupedConv where its backward applies (CPU, float32, the
    input needing a gradient, no autocast), else F.conv2d."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.requires_grad
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
        return GroupedConv.apply(x.contiguous(memory_format=torch.channels_last), w, R, stride, pad)
    return F.conv2d(x, w, stride=stride, padding=pad, groups=R)
