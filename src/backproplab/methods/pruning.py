"""Pruning and low rank: masks and projections on the flat (R, P) weights, so every gradient path
(the numba kernels and the fused products too) keeps running the dense net with zeros in it.

prune      removes a fraction `sparsity` of the prunable weights (every weight matrix and kernel,
           names *_w; biases and normalization gains stay) by one criterion:
             global      the smallest |w| over all layers at once (one threshold per replica)
             layerwise   the smallest |w| of each layer, the same fraction in every layer
             random      a fixed random order per replica and layer (the baseline)
             structured  whole units: output filters of the convolutions and units of the hidden
                         linear layers by the L2 norm of their incoming weights, with their biases
                         and the next layer's weights that read only the removed unit's zeros (not
                         Net1989's H2 on H1: its table and -1 padding still read them); the same
                         share of units in every layer but the last, chosen so the weights removed
                         come nearest the sparsity asked for
           on a schedule over the run's steps T: oneshot (at start * T), gradual (Zhu & Gupta's
           cubic ramp s_t = s (1 - (1 - (t - t0) / (t1 - t0))^3) at every step from start * T to
           end * T), iterative (`cycles` prunings from start * T to end * T, each removing the same
           share of what is left: s_j = 1 - (1 - s)^((j + 1) / cycles)). Lottery-ticket rewinding: at
           each pruning the survivors go back to their values at step 0 (rewind=init) or at the
           start of pass rewind_pass (rewind=pass). A pruned weight's gradient is zeroed (as if the
           mask multiplied the weight in the forward pass) and the weight is set to 0 after every
           step, so no optimizer state or weight decay revives it; masks only shrink.
nm_sparse  N:M semi-structured masks (2:4: two of every four consecutive input weights of a unit),
           on the layers whose inputs per unit are a multiple of M; the others stay dense.
lowrank    the best rank-r approximation (truncated SVD) of H3 (30 x 192) and of the H1 / H2 kernels
           as (12, 25) and (12, 200) matrices, at start * T and after every later step (fine-tuning
           stays in the rank-r set: projected gradient descent); parameters r (m + n) per layer.

Masks and rewinding weights are part of the engine's state (a resumed run is bit-identical).
"""
import math

import numpy as np
import torch

from .augment import pass_generator
from .registry import Method, Option, register

CRITERIA = ("global", "layerwise", "random", "structured")
SCHEDULES = ("oneshot", "gradual", "iterative")
RANDOM_TAG = 300   # generator tag of the random criterion's order (+ the method's rank)


def layers(ctx) -> list:
    """[(name, first column, last column + 1, per-replica shape)] of every parameter in W's order."""
    out, a = [], 0
    for n in ctx.param_names:
        shp = tuple(ctx.views[n].shape[1:])
        b = a + int(np.prod(shp))
        out.append((n, a, b, shp))
        a = b
    return out


def prunable(ctx) -> list:
    return [(n, a, b, s) for n, a, b, s in layers(ctx) if n.endswith("_w") and len(s) >= 2]


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """score (R, N) -> bool (R, N): the k largest of each row kept (ties: the lower index)."""
    k = max(0, min(k, score.shape[1]))
    out = torch.zeros(score.shape, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        out.scatter_(1, idx, True)
    return out


def consumer_axis(shape: tuple, units: int):
    """How the next weight tensor reads a layer of `units` outputs: ('in', k) when its input axis is
    the units (a convolution), ('flat', k) when its inputs are the units' maps flattened (k values a
    unit), else None (Net1989's H2 reads 8 of the 12 H1 maps through its table)."""
    if len(shape) == 4 and shape[1] == units:
        return ("in", 1)
    if len(shape) == 2 and shape[1] % units == 0:
        return ("flat", shape[1] // units)
    return None


def structured_layout(ctx) -> list:
    """[(name, a, b, shape, units or None (the last layer), index of the layer it reads or None)].
    A layer reads its predecessor's units when its weights on a removed unit see only zeros: the plain
    nets (no normalization, which would turn a removed unit's 0 into its shift), zero padding or none."""
    lay = prunable(ctx)
    plain = not any(n.endswith(("_ng", "_nb")) for n in ctx.param_names)
    out = []
    for i, (n, a, b, sh) in enumerate(lay):
        units = None if n in ctx.final_names else sh[0]
        src = None
        if plain and i > 0 and out[i - 1][4] is not None and consumer_axis(sh, out[i - 1][4]) is not None:
            src = i - 1
        out.append((n, a, b, sh, units, src))
    return out


def plan_kept(layout, r) -> float:
    """Weights kept when layer i loses r[i] of its units (and its readers their inputs from them)."""
    kept = 0.0
    for i, (n, a, b, sh, U, src) in enumerate(layout):
        share = 1.0 if U is None else (U - r[i]) / U
        if src is not None:
            Us = layout[src][4]
            share *= (Us - r[src]) / Us
        kept += (b - a) * share
    return kept


def unit_plan(layout, keep: float) -> list:
    """Units removed per layer, the same share u of every layer but the last (at least one unit kept),
    with u the share whose kept weights come nearest keep * all prunable weights."""
    total = sum(b - a for _, a, b, _, _, _ in layout)
    best, best_err = None, math.inf
    for u in np.linspace(0.0, 1.0, 1001):
        r = [0 if U is None else min(U - 1, round(u * U)) for _, _, _, _, U, _ in layout]
        err = abs(plan_kept(layout, r) / total - keep)
        if err < best_err - 1e-12:
            best, best_err = r, err
    return best


class Masked:
    """Mask bookkeeping shared by prune and nm_sparse: mask (R, P) bool over all of W's columns."""

    def __init__(self, opts, rank=0, seeds=(0,), **ctx):
        self.opts, self.rank, self.seeds = opts, rank, list(seeds)
        self.mask, self.rewind_w, self.done = None, None, 0   # done: steps taken (in the state)

    # events: steps done (0 = before the first step) -> target sparsity
    def events(self, T: int) -> dict:
        return {int(round(self.opts["start"] * T)): None}

    def pass_start(self, ctx):
        if self.done == 0 and self.opts.get("rewind") == "init" and self.rewind_w is None:
            self.rewind_w = ctx.w.detach().clone()
        if self.opts.get("rewind") == "pass" and ctx.pass_idx == self.opts["rewind_pass"] and self.rewind_w is None:
            self.rewind_w = ctx.w.detach().clone()
        T = getattr(ctx, "total_steps", None)   # train_batch() sets it after the first pass_start
        if self.done == 0 and (T or self.opts["start"] == 0):
            ev = self.events(max(int(T or 1), 1))
            if 0 in ev:
                self.prune(ctx, ev[0])

    def after_backward(self, ctx):
        if self.mask is not None:
            ctx.g.mul_(self.mask)

    def after_step(self, ctx):
        ev = self.events(ctx.total_steps)
        k = self.done = ctx.step + 1
        if k in ev and k > 0:
            self.prune(ctx, ev[k])
        elif self.mask is not None:
            with torch.no_grad():
                ctx.w.mul_(self.mask)

    def prune(self, ctx, target):
        new = self.new_mask(ctx, target).to(ctx.w.device)
        self.mask = new if self.mask is None else (self.mask & new)
        with torch.no_grad():
            if self.rewind_w is not None and self.opts.get("rewind", "none") != "none":
                ctx.w.copy_(self.rewind_w)
            ctx.w.mul_(self.mask)

    def kept_fraction(self, ctx) -> list:
        """Per replica: the fraction of prunable weights kept (1.0 before any pruning)."""
        if self.mask is None:
            return [1.0] * ctx.R
        cols = torch.cat([torch.arange(a, b) for _, a, b, _ in prunable(ctx)])
        return self.mask[:, cols].float().mean(1).tolist()

    def state(self):
        st = {"done": self.done}
        if self.mask is not None:
            st["mask"] = self.mask.to(torch.uint8)
        if self.rewind_w is not None:
            st["rewind"] = self.rewind_w
        return st

    def load_state(self, d):
        self.done = int(d["done"])
        self.mask = torch.as_tensor(d["mask"]).bool().clone() if "mask" in d else None
        self.rewind_w = torch.as_tensor(d["rewind"]).clone() if "rewind" in d else None


class Prune(Masked):
    def events(self, T):
        o = self.opts
        s, k0 = o["sparsity"], int(round(o["start"] * T))
        k1 = max(k0, int(round(o["end"] * T)))
        if o["schedule"] == "oneshot":
            return {k0: s}
        if o["schedule"] == "gradual":
            if k1 == k0:
                return {k0: s}
            return {k: s * (1.0 - (1.0 - (k - k0) / (k1 - k0)) ** 3) for k in range(k0, k1 + 1)}
        c = o["cycles"]
        ks = [k0 + round(j * (k1 - k0) / max(c - 1, 1)) for j in range(c)]
        ev = {}
        for j, k in enumerate(ks):
            ev[k] = 1.0 - (1.0 - s) ** ((j + 1) / c)   # a repeated step keeps the deeper target
        return ev

    def new_mask(self, ctx, s):
        R, P = ctx.w.shape
        w = ctx.w.detach().cpu()
        old = torch.ones(R, P, dtype=torch.bool) if self.mask is None else self.mask.cpu()
        mask = torch.ones(R, P, dtype=torch.bool)
        crit, lay = self.opts["criterion"], prunable(ctx)
        if crit == "global":
            cols = torch.cat([torch.arange(a, b) for _, a, b, _ in lay])
            score = torch.where(old[:, cols], w[:, cols].abs(), torch.full_like(w[:, cols], -1.0))
            mask[:, cols] = keep_top(score, round((1.0 - s) * len(cols)))
        elif crit in ("layerwise", "random"):
            for n, a, b, _ in lay:
                base = w[:, a:b].abs() if crit == "layerwise" else self._order(ctx, a, b)
                score = torch.where(old[:, a:b], base, torch.full_like(base, -1.0))
                mask[:, a:b] = keep_top(score, round((1.0 - s) * (b - a)))
        else:
            mask = self._structured(ctx, w, old, s)
        return mask

    def _order(self, ctx, a, b):
        if getattr(self, "_scores", None) is None:   # drawn once per replica: a fixed random order
            self._scores = torch.stack([torch.rand(ctx.w.shape[1], generator=pass_generator(
                s, 0, RANDOM_TAG + self.rank)) for s in self.seeds])
        return self._scores[:, a:b]

    def _structured(self, ctx, w, old, s):
        R, P = w.shape
        mask = torch.ones(R, P, dtype=torch.bool)
        layout = structured_layout(ctx)
        r_plan = unit_plan(layout, 1.0 - s)
        spans = {n: (a, b, sh) for n, a, b, sh in layers(ctx)}
        kept_units = {}
        for i, (n, a, b, sh, U, src) in enumerate(layout):
            if U is None:
                continue
            wu = w[:, a:b].reshape(R, U, -1)
            alive = old[:, a:b].reshape(R, U, -1).any(-1)
            norm = torch.where(alive, wu.norm(dim=-1), torch.full((R, U), -1.0))
            keep_u = keep_top(norm, U - r_plan[i])                              # (R, U)
            kept_units[i] = keep_u
            mask[:, a:b] &= keep_u.unsqueeze(-1).expand(R, U, (b - a) // U).reshape(R, -1)
            bias = n[:-2] + "_b"
            if bias in spans and spans[bias][2][0] == U:
                ba, bb, _ = spans[bias]
                mask[:, ba:bb] &= keep_u.unsqueeze(-1).expand(R, U, (bb - ba) // U).reshape(R, -1)
        for i, (n, a, b, sh, U, src) in enumerate(layout):   # readers of removed units
            if src is None:
                continue
            ku = kept_units[src]                                                 # (R, Us)
            kind, k = consumer_axis(sh, layout[src][4])
            view = mask[:, a:b].reshape(R, *sh).clone()
            if kind == "in":
                view &= ku.view(R, 1, -1, *([1] * (len(sh) - 2)))
            else:
                view &= ku.repeat_interleave(k, dim=1).view(R, 1, -1)
            mask[:, a:b] = view.reshape(R, -1)
        return mask


class NMSparse(Masked):
    def new_mask(self, ctx, _):
        n, m = self.opts["n"], self.opts["m"]
        w = ctx.w.detach().cpu()
        R, P = w.shape
        mask = torch.ones(R, P, dtype=torch.bool)
        for name, a, b, sh in nm_layers(ctx, m):
            groups = w[:, a:b].reshape(R, -1, m).abs()                          # (R, G, m) consecutive inputs
            idx = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
            keep = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, idx, True)
            mask[:, a:b] = keep.reshape(R, -1)
        return mask


def nm_layers(ctx, m):
    """The prunable layers whose inputs per unit (all axes after the first) are a multiple of m."""
    return [(n, a, b, s) for n, a, b, s in prunable(ctx) if int(np.prod(s[1:])) % m == 0]


# -- low rank ------------------------------------------------------------------------------------
LOWRANK_LAYERS = {"h3": ("h3_w",), "conv": ("h1_w", "h2_w")}


def truncate(mat: torch.Tensor, r: int) -> torch.Tensor:
    """(..., m, n) -> its best rank-r approximation in the Frobenius norm (Eckart-Young): the
    projection onto its top r singular vectors on the short side, U_r U_r^T mat = U_r S_r V_r^T,
    with U_r from the eigenvectors of the k x k Gram matrix (k = min(m, n)), in float64. Against
    a float32 SVD of the (8, 30, 192) H3 weights of a population, a third of the time (it ran every
    step) and 1e-7 from a float64 SVD's truncation instead of 2e-5."""
    x = mat.double()
    wide = x.shape[-2] <= x.shape[-1]
    U = torch.linalg.eigh(x @ x.mT if wide else x.mT @ x)[1][..., -r:]    # eigenvalues ascending
    return (U @ (U.mT @ x) if wide else (x @ U) @ U.mT).to(mat.dtype)


def factored_params(shape: tuple, r: int) -> int:
    m, n = shape[0], int(np.prod(shape[1:]))
    return r * (m + n)


class LowRank:
    def __init__(self, opts, **ctx):
        self.start = opts["start"]
        self.ranks = {n: opts[k] for k, names in LOWRANK_LAYERS.items() for n in names if opts[k] > 0}
        self.done = 0   # steps taken (in the state: a resumed run does not factorize again)

    def _project(self, ctx):
        with torch.no_grad():
            for n, r in self.ranks.items():
                v = ctx.views[n]
                v.copy_(truncate(v.reshape(v.shape[0], v.shape[1], -1), r).reshape(v.shape))

    def pass_start(self, ctx):
        T = getattr(ctx, "total_steps", None)
        if self.done == 0 and (self.start == 0 or (T and round(self.start * T) == 0)):
            self._project(ctx)

    def after_step(self, ctx):
        self.done = ctx.step + 1
        if self.done >= round(self.start * ctx.total_steps):
            self._project(ctx)

    def state(self):
        return {"done": self.done}

    def load_state(self, d):
        self.done = int(d["done"])


# -- checks and registration ----------------------------------------------------------------------
def check_sparsity(s):
    if not 0.0 <= s < 1.0:
        return f"sparsity={s} is outside [0, 1) (the fraction of weights removed)"
    return None


def check_prune(cfg, o):
    why = check_sparsity(o["sparsity"])
    if why:
        return why
    if o["schedule"] != "oneshot" and o["end"] < o["start"]:
        return f"end={o['end']} is before start={o['start']}"
    if o["rewind"] != "none" and o["schedule"] == "gradual":
        return "rewind needs prunings at a few steps (oneshot or iterative), not the gradual ramp at every step"
    if o["rewind"] == "pass" and o["rewind_pass"] >= o["start"] * cfg.train.passes:
        return (f"rewind_pass={o['rewind_pass']} is not before the first pruning (start={o['start']} of "
                f"{cfg.train.passes} passes)")
    if o["criterion"] == "structured" and cfg.model.name == "vit":
        return "structured pruning removes convolution filters and hidden units: model.name=vit has neither here"
    return None


def check_lowrank(cfg, o):
    if cfg.model.name != "net1989":
        return f"factorizes Net1989's H1, H2 and H3: needs model.name=net1989, not {cfg.model.name}"
    for k in ("h3", "conv"):
        if o[k] < 0:
            return f"{k}={o[k]}: a rank is 0 (dense) or more"
    if o["h3"] == 0 and o["conv"] == 0:
        return "give h3=RANK and/or conv=RANK (0 leaves a layer dense)"
    if o["h3"] > 30:
        return f"h3={o['h3']} is larger than H3 (30 x 192: its rank is at most 30)"
    if o["conv"] > 12:
        return f"conv={o['conv']} is larger than the convolutions (12 filters: H1 12 x 25, H2 12 x 200; rank at most 12)"
    return None


_NOT_AVG = {"nf": "nf standardizes every weight tensor: a removed weight's standardized value is not 0",
            "swa": "an average of weights from before and after a pruning is not sparse",
            "ema": "an average of weights from before and after a pruning is not sparse",
            "schedule_free": "its average x and sequence z bring removed weights back"}
_SCHED = dict(start=Option(0.0, "fraction of steps", "when it acts (0: before the first step)", 0.0, 1.0))
register(Method(
    "prune", kind="pruning", touches=("gradients", "weights-after-step"), impl="pruning:Prune",
    hooks=("pass_start", "after_backward", "after_step"), check=check_prune, incompatible_with=_NOT_AVG,
    options={"criterion": Option("global", "", "what goes first", choices=CRITERIA),
             "sparsity": Option(0.5, "fraction of weights", "removed, in [0, 1)"),
             "schedule": Option("oneshot", "", "", choices=SCHEDULES), **_SCHED,
             "end": Option(0.5, "fraction of steps", "gradual / iterative: the last pruning", 0.0, 1.0),
             "cycles": Option(3, "prunings", "iterative", 1, 100),
             "rewind": Option("none", "", "lottery ticket: survivors reset at each pruning",
                              choices=("none", "init", "pass")),
             "rewind_pass": Option(1, "passes", "rewind=pass: the weights at the start of this pass", 0, 10000)},
    summary="magnitude / random / structured pruning, one-shot, gradual or iterative, lottery rewinding",
    what="Masks the weight matrices and kernels (*_w) on the flat (R, P) buffer: a removed weight's gradient "
         "is zeroed and the weight reset to 0 after every step. Net1989 shares its H1/H2 kernels over "
         "positions: one H1 weight removed is 64 connections, one H2 weight 16.",
    interactions="SAM's perturbation is taken before the gradient is masked.",
    paper="Han, Pool, Tran & Dally 2015; Zhu & Gupta 2017 (gradual); Frankle & Carbin 2019 (lottery tickets); "
          "Li et al. 2017 (filters); Blalock et al. 2020 (random baseline, fair comparison)",
    oracle="numpy by hand: kept sets by sorting |w| (global, per layer), unit norms, the cubic ramp; "
           "masked SGD steps"))
register(Method(
    "nm_sparse", kind="pruning", touches=("gradients", "weights-after-step"), impl="pruning:NMSparse",
    hooks=("pass_start", "after_backward", "after_step"), incompatible_with=_NOT_AVG,
    options={"n": Option(2, "weights", "kept of every m", 1, 16), "m": Option(4, "weights", "group size", 2, 16),
             **_SCHED},
    check=lambda cfg, o: None if o["n"] < o["m"] else f"n={o['n']} must be smaller than m={o['m']}",
    summary="N:M semi-structured sparsity (2:4): n of every m consecutive input weights kept",
    what="In each unit's inputs (a row of H3, a filter's 8x5x5 inputs of H2), every group of m consecutive "
         "weights keeps its n largest |w|; layers whose inputs per unit are not a multiple of m (H1: 25, "
         "out: 30) stay dense. start=0: the mask of the initial weights from the first step.",
    paper="Mishra et al. 2021, 'Accelerating Sparse Deep Neural Networks' (NVIDIA 2:4); Zhou et al. 2021",
    oracle="numpy by hand: each group of 4 keeps its 2 largest |w|"))
register(Method(
    "lowrank", kind="compression", touches=("weights-after-step",), impl="pruning:LowRank",
    hooks=("pass_start", "after_step"), check=check_lowrank,
    incompatible_with={k: v.replace("not sparse", "not of rank r").replace("a pruning", "the factorization")
                       for k, v in _NOT_AVG.items()},
    options={"h3": Option(8, "rank", "of H3's 30 x 192, at most 30 (0: dense)"),
             "conv": Option(0, "rank", "of the H1 (12 x 25), H2 (12 x 200) kernels, at most 12 (0: dense)"),
             **_SCHED},
    summary="low rank: truncated SVD of H3 and the convolution kernels, kept there while training",
    what="At start * T the weight matrices (kernels reshaped to filters x inputs) become their best rank-r "
         "approximations U_r S_r V_r^T, and after every later step again: the fine-tuning stays rank r. "
         "A factorized layer stores r (m + n) numbers instead of m n.",
    paper="Denton et al. 2014; Jaderberg, Vedaldi & Zisserman 2014; Eckart & Young 1936",
    oracle="numpy.linalg.svd: same matrices, rank r, error equal to the dropped singular values"))
