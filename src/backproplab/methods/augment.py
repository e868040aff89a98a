"""Data methods: augmentation as batch functions and input standardization.

Each runs at the batch hook on the (B, 1, 16, 16) batch of one replica, in rank order
(shift, rotate_scale, standardize). The random ones draw from a torch.Generator seeded
by (seed, pass, method rank): a resumed run draws exactly what an uninterrupted one does.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.augment import shift_images, shift_stack
from .registry import Method, Option, register


def pass_generator(seed: int, pass_idx: int, tag: int) -> torch.Generator:
    """A generator for one replica, pass and consumer; tag separates the streams."""
    s = np.random.SeedSequence([int(seed), int(pass_idx), int(tag)]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(s[0] >> np.uint64(1)))


def random_shifts(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-k, k + 1, (n, 2), generator=gen)  # (n, 2) integer (dy, dx)


def rotate_scale_images(x: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W); angles (B,) radians, clockwise on the screen (row 0 at the top: the top
    edge moves to the right); scales (B,) > 1 enlarges.

    Bilinear resampling about the image centre; pixels from outside the image are -1
    (blank paper): grid_sample pads with 0, so it runs on x + 1.
    """
    c, s = torch.cos(angles) / scales, torch.sin(angles) / scales
    zero = torch.zeros_like(c)
    # output (u, v) in [-1, 1] samples the input at theta @ (u, v, 1); v grows downwards
    theta = torch.stack([torch.stack([c, s, zero], -1), torch.stack([-s, c, zero], -1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


class Shift:
    """One generator per replica, keyed by (seed, pass, rank): a replica draws what a solo run draws."""

    def __init__(self, opts, rank=0, seeds=(0,), **ctx):
        self.k, self.tag, self.seeds, self.gens = opts["max"], 100 + rank, list(seeds), None

    def pass_start(self, ctx):
        self.gens = [pass_generator(s, ctx.pass_idx, self.tag) for s in self.seeds]

    def batch(self, x, ctx):  # x (R, B, 1, 16, 16): every replica's draws, then one call for all
        return shift_stack(x, torch.stack([random_shifts(x.shape[1], self.k, g) for g in self.gens]).numpy())


class RotateScale(Shift):
    def __init__(self, opts, rank=0, seeds=(0,), **ctx):
        super().__init__({"max": 0}, rank, seeds)
        self.deg, self.scale = opts["degrees"], opts["scale"]

    def batch(self, x, ctx):  # x (R, B, 1, 16, 16): each replica's (2, B) draws, one resampling of all
        u = torch.stack([torch.rand(2, x.shape[1], generator=g) * 2 - 1 for g in self.gens], 1)  # in [-1, 1)
        out = rotate_scale_images(x.reshape(-1, *x.shape[2:]), (u[0] * math.radians(self.deg)).reshape(-1),
                                  1.0 + (u[1] * self.scale).reshape(-1))
        return out.view(x.shape)


def standardize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (x - mean) / std


class Standardize:
    def __init__(self, opts, **ctx):
        self.mean = self.std = None

    def pass_start(self, ctx):
        if self.mean is None:  # statistics of the raw training inputs, fixed at the first pass
            self.mean, self.std = float(ctx.pass_x.mean()), float(ctx.pass_x.std())

    def batch(self, x, ctx):
        return standardize(x, self.mean, self.std)

    eval_batch = batch

    def state(self):
        return {} if self.mean is None else {"mean": np.float64(self.mean), "std": np.float64(self.std)}

    def load_state(self, d):
        if "mean" in d:
            self.mean, self.std = float(d["mean"]), float(d["std"])


def _no_train_shift(cfg, opts):
    if cfg.train.shift > 0:
        return f"train.shift={cfg.train.shift} already shifts the inputs; set train.shift=0"
    return None


register(Method(
    "shift", kind="augmentation", touches=("data",), hooks=("pass_start", "batch"), impl="augment:Shift",
    summary="random translations of up to `max` pixels in x and y, -1 fill", check=_no_train_shift,
    options={"max": Option(1, "pixels", "largest shift", 1, 4)},
    what="Each training image is translated by an integer (dy, dx) drawn uniformly from [-max, max]^2; the "
         "uncovered border is -1 (blank paper), not a cyclic roll. train.shift does the same with train()'s "
         "stream: use one of the two.",
    paper="LeCun et al. 1998 (distortions); Simard, Steinkraus & Platt 2003",
    oracle="data.augment.shift_images, itself checked against index arithmetic"))
register(Method(
    "rotate_scale", kind="augmentation", touches=("data",), hooks=("pass_start", "batch"),
    impl="augment:RotateScale", summary="small random rotations and scalings (bilinear, -1 fill)",
    options={"degrees": Option(10.0, "degrees", "largest rotation either way", 0.0, 180.0),
             "scale": Option(0.1, "fraction", "scale drawn from [1-scale, 1+scale]", 0.0, 0.9)},
    what="Each training image is rotated by an angle uniform in [-degrees, degrees] and scaled by a factor "
         "uniform in [1-scale, 1+scale] about its centre, resampled bilinearly; outside pixels are -1.",
    paper="Simard, Steinkraus & Platt 2003, 'Best Practices for CNNs Applied to Visual Document Analysis'",
    oracle="a 90-degree rotation equals torch.rot90; scale 2 equals a bilinear 2x zoom of the centre"))
register(Method(
    "standardize", kind="augmentation", touches=("data",), hooks=("pass_start", "batch", "eval"),
    impl="augment:Standardize", summary="input standardization: (x - mean) / std of the training pixels",
    what="Subtracts the mean and divides by the standard deviation of all training pixels (one scalar each, "
         "computed from the raw training set at the first pass and kept in the state), at training and at "
         "evaluation. The model's own -1 border padding is unchanged.",
    paper="LeCun, Bottou, Orr & Mueller 1998, 'Efficient BackProp' section 4.3",
    oracle="the transformed training set has mean 0 and standard deviation 1"))


SHIFT_SETS = {1: [(0, 0)], 5: [(0, 0), (-1, 0), (0, -1), (0, 1), (1, 0)],
              9: [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]}


def tta_log_probs(outputs_of, x: torch.Tensor, n: int) -> torch.Tensor:
    """log of the mean softmax over the n one-pixel shifts of SHIFT_SETS[n]; outputs_of(x) -> (R, B, 10)
    logits. The log keeps what the evaluation reads: its argmax is the averaged prediction, its
    cross-entropy the loss of that prediction."""
    logp = [torch.log_softmax(outputs_of(shift_images(x, np.tile(np.array(s, np.int64), (len(x), 1)))).float(), -1)
            for s in SHIFT_SETS[n]]
    return torch.logsumexp(torch.stack(logp), 0) - math.log(len(logp))  # stable where a softmax underflows


class TestTimeShifts:
    def __init__(self, opts, **ctx):
        self.n = opts["n"]

    def eval_outputs(self, outputs_of, x, ctx):
        return tta_log_probs(outputs_of, x, self.n)


def _tta_check(cfg, opts):
    return None if cfg.train.loss == "ce" else f"averages softmax outputs: needs train.loss=ce, not {cfg.train.loss}"


register(Method(
    "tta", kind="augmentation", touches=("data",), hooks=("eval",), impl="augment:TestTimeShifts",
    summary="test-time augmentation: the softmax averaged over one-pixel shifts of each image",
    options={"n": Option(9, "shifted copies", "the image and its 4 or 8 one-pixel translations", 1, 9,
                         choices=(1, 5, 9))},
    check=_tta_check,
    what="At evaluation only (training is unchanged), every image is presented n times: itself (n=1), "
         "with its four one-pixel moves (n=5), or all nine translations by -1, 0, +1 pixels in y and x "
         "(n=9, -1 fill); the prediction is the mean of the n softmax outputs, and the loss is the "
         "cross-entropy of that mean. Costs n forward passes per evaluated image.",
    paper="Simard, Steinkraus & Platt 2003; Krizhevsky, Sutskever & Hinton 2012 (averaging over crops)",
    oracle="the mean of softmax outputs over shifted copies built by slicing a -1-padded image"))
