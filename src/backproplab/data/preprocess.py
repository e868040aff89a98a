"""The 1989 preprocessing (SPEC section 1): uint8 28x28 -> float32 16x16 in [-1, 1]."""
import numpy as np
import torch
import torch.nn.functional as F


def preprocess_1989(images: np.ndarray, labels: np.ndarray, size: int = 16):
    """-> x (N, 1, size, size) float32 in [-1, 1], y (N, 10) float32 targets +-1, labels (N,) int64.

    uint8/127.5 - 1, then bilinear resize 28 -> size with align_corners=False and no
    antialias (what the 1989 reproduction does).
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    x = x.unsqueeze(1)  # (N, 1, 28, 28)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    y = torch.full((len(lab), 10), -1.0)
    y[torch.arange(len(lab)), lab] = 1.0
    return x.contiguous(), y, lab
