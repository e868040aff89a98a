"""The per-pass shifted copies of the training set for every replica, in numba.

data.augment.shift_images is the definition (and the path for any device and dtype); this loop
computes the same copies for R replicas at once on the CPU: at 8 replicas of 6,291 digits a
pass, torch.stack over shift_images took ~130 ms and a torch.gather of all of them ~500 ms,
this ~13 ms (a tenth of an autograd-path pass of the modern recipe went to the copies).
"""
import numpy as np
from numba import njit


@njit(cache=True)
def shift_into(x, s, out):
    """x (1 or R, B, C, H, W) float32 (one batch shared, or each replica's); s (R, B, 2) integer
    (dy, dx); out (R, B, C, H, W) float32: out[r, i, c, y, v] = x[r or 0, i, c, y - dy, v - dx],
    -1 where that falls outside the image."""
    R, B = s.shape[0], s.shape[1]
    C, H, W = x.shape[2], x.shape[3], x.shape[4]
    blank = np.float32(-1.0)
    for r in range(R):
        xr = x[r] if x.shape[0] > 1 else x[0]
        for i in range(B):
            dy, dx = np.int64(s[r, i, 0]), np.int64(s[r, i, 1])
            for c in range(C):
                for y in range(H):
                    sy = y - dy
                    if sy < 0 or sy >= H:
                        out[r, i, c, y, :] = blank
                        continue
                    for v in range(W):
                        sv = v - dx
                        out[r, i, c, y, v] = xr[i, c, sy, sv] if 0 <= sv < W else blank
