"""Augmentation as batch functions, and the per-pass random streams every engine shares.

Randomness is data: the shifts and dropout masks of pass p for replica seed s come from
np.random.default_rng([s, p]), so the eager and fast engines see the same numbers and a
resumed run draws exactly what an uninterrupted one would.
"""
import numpy as np
import torch


def shift_images(x: torch.Tensor, shifts) -> torch.Tensor:
    """x (B, C, H, W); shifts (B, 2) integer (dy, dx). out[i, j] = x[i-dy, j-dx], -1 where out of range.

    A translation with background fill, not a cyclic roll: pixels pushed off the edge are
    lost and the uncovered border is -1 (the blank-paper value).
    """
    shifts = torch.as_tensor(np.asarray(shifts), dtype=torch.long)
    B, C, H, W = x.shape
    m = int(shifts.abs().max()) if len(shifts) else 0
    if m == 0:
        return x
    padded = torch.nn.functional.pad(x, (m, m, m, m), value=-1.0)  # (B, C, H+2m, W+2m)
    rows = (torch.arange(H).view(1, H) - shifts[:, :1] + m)       # (B, H)
    cols = (torch.arange(W).view(1, W) - shifts[:, 1:] + m)       # (B, W)
    b = torch.arange(B).view(B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[b, rows.view(B, H, 1), cols.view(B, 1, W)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def shift_stack(x: torch.Tensor, shifts) -> torch.Tensor:
    """x (B, C, H, W) shared, or (R, B, C, H, W) each replica's batch; shifts (R, B, 2) -> (R, B, C,
    H, W): shift_images(x or x[r], shifts[r]) for every r, the same numbers; on the CPU in float32
    by one numba loop (data/_shift.py), else stacked."""
    shifts = np.asarray(shifts)
    per = x.dim() == 5
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.stack([shift_images(x[r] if per else x, s) for r, s in enumerate(shifts)])
    from ._shift import shift_into  # numba: imported where it runs
    xs = x if per else x.unsqueeze(0)
    out = np.empty((shifts.shape[0],) + tuple(xs.shape[1:]), np.float32)
    shift_into(np.ascontiguousarray(xs.numpy()), np.ascontiguousarray(shifts), out)
    return torch.from_numpy(out)


def pass_randomness(seed: int, pass_idx: int, n: int, shift: int, dropout: float, units: int = 192):
    """-> (shifts (n, 2) int8 or None, keep (n, units) bool or None) for one replica and pass."""
    if shift <= 0 and dropout <= 0:
        return None, None
    rng = np.random.default_rng([int(seed), int(pass_idx)])
    shifts = rng.integers(-shift, shift + 1, size=(n, 2), dtype=np.int8) if shift > 0 else None
    keep = (rng.random((n, units), dtype=np.float32) >= dropout) if dropout > 0 else None
    return shifts, keep
