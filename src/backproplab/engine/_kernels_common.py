"""Lane-wise pieces shared by the solo and population kernels.

Both kernels call these on 16-lane vectors; whether a lane is an image position (solo)
or a replica (population), it goes through the same operations in the same order, which
is what makes replica k of a population bit-identical to a solo run.
"""
import math

import numpy as np
from numba import njit

from ._simd import vmax, vmul, vpos, vsplat, vsub, vtanh

# codes passed to the kernels
ACT = {"tanh": 0, "relu": 1, "scaled_tanh": 2}
OUT = {"tanh": 0, "relu": 1, "scaled_tanh": 2, "none": 3}   # the hidden codes, and none (logits)
LOSS = {"mse": 0, "ce": 1}
OPT = {"sgd": 0, "adamw": 1, "grad": 2}   # grad: write the gradient into M instead of stepping (vstep)

F0, F1 = np.float32(0.0), np.float32(1.0)
ST_A = np.float32(1.7159)                       # LeCun's scaled tanh: ST_A * tanh(ST_B * x)
ST_B = np.float32(2.0 / 3.0)
ST_AB = np.float32(1.7159 * 2.0 / 3.0)
MSE_G = np.float32(0.2)                         # d mean_10((y-t)^2) / dy = 0.2 (y-t); 0.1f*2 == 0.2f


@njit
def abuf(n, fill):
    """A float32 work array of n elements filled with `fill`, 64-byte aligned: a 16-lane
    vector at a multiple of 16 is then one cache line (numba's own arrays are only
    32-byte aligned, and split lines cost the population kernel ~1/4 of its time)."""
    b = np.full(n + 16, np.float32(fill))
    off = ((64 - b.ctypes.data % 64) % 64) // 4
    return b[off:off + n]


def aligned(a) -> np.ndarray:
    """a itself if it is a 64-byte aligned C-contiguous float32 array, else aligned_copy(a)."""
    if isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % 64 == 0:
        return a
    return aligned_copy(a)


def aligned_copy(a) -> np.ndarray:
    """A 64-byte aligned, C-contiguous float32 copy of a (for parameters and inputs)."""
    a = np.asarray(a, np.float32)
    buf = np.empty(a.size + 16, np.float32)
    off = ((64 - buf.ctypes.data % 64) % 64) // 4
    out = buf[off:off + a.size].reshape(a.shape)
    out[...] = a
    return out


@njit(inline="always")
def act_fwd(z, act):
    """-> (h, d) with d = dh/dz, so the backward pass is dz = dh * d for every activation."""
    if act == 0:
        h = vtanh(z)
        return h, vsub(vsplat(F1), vmul(h, h))
    if act == 1:
        h = vmax(z, vsplat(F0))
        return h, vpos(h, vsplat(F1))          # torch: the gradient passes where the output > 0
    t = vtanh(vmul(z, vsplat(ST_B)))
    return vmul(t, vsplat(ST_A)), vmul(vsub(vsplat(F1), vmul(t, t)), vsplat(ST_AB))


@njit(inline="always")
def out_fwd(z, out_act):
    """-> (y, dy/dz) of the output nonlinearity (OUT codes)."""
    if out_act == 3:
        return z, vsplat(F1)
    return act_fwd(z, out_act)


@njit(inline="always")
def step_constants(k, lr, opt, step, wd, b1, b2, eps):
    """Fill k for one step (float64 maths like torch's Python-side scalars, then float32)."""
    k[0] = np.float32(-lr)
    if opt == 1:
        lr64 = np.float64(lr)
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        k[1] = np.float32(1.0 - lr64 * wd)
        k[2] = np.float32(1.0 - b1)
        k[3] = np.float32(1.0 - b2)
        k[4] = np.float32(b2)
        k[5] = np.float32(1.0 / math.sqrt(bc2))
        k[6] = np.float32(eps)
        k[7] = np.float32(-(lr64 / bc1))


@njit(inline="always")
def loss_grad(y, dout, o, st, lab, loss, g):
    """g[o + q*st] = dL/dz_q for the 10 outputs, from y[o + q*st] and dout = dy/dz likewise.

    mse: torch.mean((y - t)^2), t = +-1; ce: softmax cross-entropy on y (logits), batch of one.
    Scalar code on one replica: solo passes (o=0, st=1), the population (o=lane, st=16).
    """
    if loss == 0:
        for q in range(10):
            t = F1 if q == lab else -F1
            g[o + q * st] = (MSE_G * (y[o + q * st] - t)) * dout[o + q * st]
    else:
        mx = y[o]
        for q in range(1, 10):
            mx = max(mx, y[o + q * st])
        s = F0
        for q in range(10):
            s += np.float32(math.exp(y[o + q * st] - mx))
        ls = np.float32(math.log(s))
        for q in range(10):
            p = np.float32(math.exp(y[o + q * st] - mx - ls))
            g[o + q * st] = (p - (F1 if q == lab else F0)) * dout[o + q * st]
