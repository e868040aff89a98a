"""Large keep masks drawn fast: DropConnect's per-example masks on H3's 192x30 weights.

DropConnect needs B x 5,760 Bernoulli draws a step per replica; torch.rand and the
comparison cost about 0.9 ms of a replica's step at batch 32 (ten times the kernel's own
work for the batch). Here the replica's noise generator gives one 63-bit key per mask (so
the draw keeps its place in the (seed, pass) stream, as every other mask's does), and the
mask is a counter-based hash of that key: splitmix64 (Steele, Lea & Flood 2014) of
key + (i + 1) * golden gives 64 bits for four consecutive entries, 16 bits each; an entry
is kept iff its 16 bits are >= round(p * 65536), so the drop rate is p to within 2^-17.
About 0.03 ms for the 184,320 entries of a batch of 32 (numba; one pass, no temporaries).
Both the autograd path (models/modnet.py, models/stacked.py) and the numba kernels
(engine/population.py) take their masks from here, so they see the same ones.
"""
import numpy as np
import torch
from numba import njit

KEY_BITS = 63


@njit(cache=True)
def _fill_keep(key, thr, scale, out):
    """out[k] = scale if 16-bit draw k >= thr else 0, for k < 4 * (len(out) // 4)."""
    golden, m1, m2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    s30, s27, s31, s16, low = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(16), np.uint64(0xFFFF)
    zero = np.float32(0.0)
    for i in range(out.shape[0] // 4):
        z = key + np.uint64(i + 1) * golden
        z = (z ^ (z >> s30)) * m1
        z = (z ^ (z >> s27)) * m2
        z = z ^ (z >> s31)
        for j in range(4):
            out[4 * i + j] = scale if (z & low) >= thr else zero
            z = z >> s16


def fill_keep(out: np.ndarray, p: float, gen) -> np.ndarray:
    """Fill out (float32, 1-D, contiguous, a multiple of 4 long) with keep factors: 0 with
    probability p, else 1/(1-p) (dropout_mask's scaling in float32); one key drawn from the
    torch generator gen."""
    key = int(torch.randint(0, 2 ** KEY_BITS - 1, (1,), generator=gen))
    _fill_keep(np.uint64(key), np.uint64(round(p * 65536)), np.float32(1.0) / np.float32(1.0 - p), out)
    return out


def hashed_keep(shape, p: float, gen) -> torch.Tensor:
    """Keep factors of `shape` as a float32 tensor (fill_keep)."""
    n = int(np.prod(shape))
    out = fill_keep(np.empty((n + 3) // 4 * 4, np.float32), p, gen)
    return torch.from_numpy(out[:n]).view(*shape)
