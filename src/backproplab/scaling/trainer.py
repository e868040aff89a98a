"""Train one study cell: L learning rates x S seeds of one model at once, a population on the
one engine.

The cell is a Population (engine/population.py) of R = S x L replicas, seed-major (replica
k L + j is seed k at rate j): the replicas of one seed start from that seed's weights (the
learning rate is the only difference between them) and see that seed's batches; each seed
has its own training subset (the caller's: x and labels given per seed) and its own epoch
order (an exactly-once sampler keyed by the seed), so a cell's seeds differ as separate runs
would, yet train in one stacked step (per-replica batches, Population.train_batch). Replica
k L + j equals the same cell trained for seed k alone (tested). The recipe is made of
registered methods, decayed by a cosine over the run's own number of steps (seed 002: the
schedule scaled to each run's length):
  sgd    momentum (torch.optim.SGD's buf = mu buf + g, w -= lr buf), weight decay as the l2
         method (coupled, the gradient gains wd w): the convnet default, as seed 002's NFNets;
  adamw  torch.optim.AdamW's update (the ViT default: SGD trains the micro-ViT badly, and seed
         002 compares each family under its own usual recipe).
`methods` adds any other registered method to a cell (`scale run +method=NAME`). A method
that reads the pass's input statistics (standardize) sees every seed's subset together.

Batches come from the exactly-once-per-epoch samplers; a run of `epochs` epochs over n
examples takes examples_for(epochs, n) examples, the last batch smaller if need be (every
seed's subset has the same n, so the seeds' batches have the same sizes and epoch bounds).
Checkpoints (the engine's state, every sampler's position, the step) are written atomically
every `ckpt_seconds` (or `ckpt_steps`) and a restarted cell continues from the last one to
the same numbers as an uninterrupted run.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, MethodSpec, validate
from ..data.sampler import EpochSampler, examples_for
from ..engine.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint, to_numpy_state
from .families import VIT_HEADS, VIT_PATCH, vit_shape


def spec_methods(spec) -> list:
    """A study's added methods (spec["methods"]) as MethodSpecs; none in a default study."""
    return [MethodSpec(m["name"], dict(m["options"])) for m in spec.get("methods", [])]


def cell_refusal(name: str) -> str | None:
    """Why a registered method cannot run in a scaling cell, or None. A cell's epochs are cut by
    its checkpoints (every minute, mid-epoch) and it has no pass boundaries of its own."""
    from ..methods.registry import get_method
    m = get_method(name)
    if "pass_end" in m.hooks:
        return f"method {name} acts at the end of a pass, and a scaling cell has no pass boundaries"
    if "batch" in m.hooks and name != "standardize":
        return f"method {name} draws a random stream per pass, which a mid-epoch resume of a cell would restart"
    return None


def cell_config(member, optim, batch, momentum, weight_decay, betas, eps, methods=()) -> Config:
    """The cell's recipe as a config: the family member, cross-entropy, the optimizer and cosine;
    each of `methods` replaces what it replaces (a schedule the cosine, an optimizer the default)."""
    from ..errors import UserError
    from ..methods.registry import with_method
    cfg = Config(name=f"cell-{member.family}{member.size}")
    m = cfg.model
    m.name, m.act, m.out_act = member.family, "relu", "none"
    if member.family == "convnet":
        m.depth = member.size
    else:
        m.dim, m.depth = vit_shape(member.size)
        m.heads, m.patch = VIT_HEADS, VIT_PATCH
    cfg.train.loss, cfg.train.engine, cfg.train.batch = "ce", "population", int(batch)
    o = cfg.optim
    o.lr_end = None
    specs = [MethodSpec("cosine", {})]
    if optim == "sgd":
        specs.append(MethodSpec("momentum", {"momentum": float(momentum)}))
        if weight_decay:
            specs.append(MethodSpec("l2", {"lam": float(weight_decay)}))
    else:
        o.name, o.beta1, o.beta2, o.eps, o.weight_decay = "adamw", betas[0], betas[1], eps, float(weight_decay)
    cfg.methods = specs
    for spec in methods:
        why = cell_refusal(spec.name)
        if why:
            raise UserError(why)
        cfg = with_method(cfg, spec)
    return validate(cfg)


class CellTrainer:
    def __init__(self, member, lrs, x, labels, epochs: float, *, optim="sgd", batch=32, momentum=0.9,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0, seeds=None, ckpt=None, ckpt_seconds=60.0,
                 ckpt_steps=None, tag="", methods=()):
        """x (n, 1, 16, 16) and labels (n,) shared by every seed, or sequences of S such tensors (one
        training subset per seed, the same n); seeds: the S seeds (default [seed])."""
        from ..engine.population import Population
        if optim not in ("sgd", "adamw"):
            raise ValueError(f"optim must be sgd or adamw, not {optim!r}")
        self.seeds = [int(seed)] if seeds is None else [int(s) for s in seeds]
        self.S = len(self.seeds)
        if self.S < 1 or len(set(self.seeds)) != self.S:
            raise ValueError(f"a cell needs distinct seeds, not {self.seeds}")
        self.batch = int(batch)
        xs = list(x) if isinstance(x, (list, tuple)) else [x] * self.S
        ys = list(labels) if isinstance(labels, (list, tuple)) else [labels] * self.S
        if len(xs) != self.S or len(ys) != self.S or len({len(v) for v in ys}) != 1:
            raise ValueError("x and labels: one tensor each, or one per seed, all of the same length")
        self.xs, self.ys = xs, ys                             # per seed: (n, 1, 16, 16) float32, (n,) int64
        self.x, self.labels = xs[0], ys[0]
        self.n = len(ys[0])
        self.pass_x = xs[0] if all(v is xs[0] for v in xs) else torch.cat(xs)
        self.rates = [float(v) for v in lrs]
        self.L = len(self.rates)
        self.lrs = torch.tensor(self.rates * self.S, dtype=torch.float32)        # (R,), seed-major
        self.R = len(self.lrs)
        self.total = examples_for(epochs, self.n)             # examples the run takes
        self.steps = math.ceil(self.total / self.batch)
        self.cfg = cell_config(member, optim, batch, momentum, weight_decay, betas, eps, methods)
        self.pop = Population(self.cfg, [s for s in self.seeds for _ in range(self.L)], lrs=self.lrs.tolist())
        self.W = self.pop.W                                    # (R, P), the replicas' weights
        self.samplers = [EpochSampler(self.n, s) for s in self.seeds]
        self.sampler = self.samplers[0]
        self.step = 0
        self.ckpt, self.ckpt_seconds, self.ckpt_steps = (Path(ckpt) if ckpt else None), ckpt_seconds, ckpt_steps
        self.tag = tag                                          # identifies the cell in its checkpoint
        self.on_batch = None                                    # hook(step, idx) for tests and logs
        self.resumed_from = 0
        if self.ckpt is not None and has_checkpoint(self.ckpt):
            self._load()

    def replica(self, k, j) -> int:
        """Row of W (and of evaluate()'s list) of seed index k at rate index j."""
        return k * self.L + j

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self):
        save_checkpoint(self.ckpt, {"tag": self.tag, "step": self.step, "engine": self.pop.state(),
                                    "samplers": [s.state_dict() for s in self.samplers], "lrs": self.lrs.clone(),
                                    "seeds": list(self.seeds), "config": self.cfg.to_json()})

    def _load(self):
        st = load_checkpoint(self.ckpt)
        if st.get("tag") != self.tag or st.get("config") != self.cfg.to_json() or "engine" not in st \
                or "samplers" not in st or [int(v) for v in st.get("seeds", [])] != self.seeds \
                or not torch.equal(st["lrs"], self.lrs):
            return                                              # another cell's or an old layout: start fresh
        self.pop.load_state(to_numpy_state(st["engine"]))
        for smp, sd in zip(self.samplers, st["samplers"]):
            smp.load_state_dict({k: int(v) for k, v in sd.items()})
        self.step = self.resumed_from = int(st["step"])

    # -- training -------------------------------------------------------------------------
    def run(self, stop_after=None):
        """Train to the end (or `stop_after` more steps); -> seconds spent here."""
        t0 = last = time.perf_counter()
        end = self.steps if stop_after is None else min(self.steps, self.step + stop_after)
        while self.step < end:
            k = min(self.batch, self.total - self.sampler.consumed)
            epoch = self.sampler.consumed // self.n             # keys the pass's random streams (every seed's)
            idx = [smp.take(k) for smp in self.samplers]
            if self.on_batch is not None:
                self.on_batch(self.step, idx[0] if self.S == 1 else np.stack(idx))
            if self.S == 1:
                self.pop.train_batch(self.x[idx[0]], self.labels[idx[0]], self.steps, epoch, self.pass_x)
            else:                                               # (S, k, ...) -> every seed's L replicas
                bx = torch.stack([xk[i] for xk, i in zip(self.xs, idx)])
                by = torch.stack([yk[i] for yk, i in zip(self.ys, idx)])
                bx = bx.unsqueeze(1).expand(-1, self.L, -1, -1, -1, -1).reshape(self.R, k, 1, 16, 16)
                by = by.unsqueeze(1).expand(-1, self.L, -1).reshape(self.R, k)
                self.pop.train_batch(bx, by, self.steps, epoch, self.pass_x)
            self.step += 1
            now = time.perf_counter()
            due = (self.ckpt_steps and self.step % self.ckpt_steps == 0) or now - last >= self.ckpt_seconds
            if self.ckpt is not None and due and self.step < self.steps:
                self._save()
                last = now
        return time.perf_counter() - t0

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    def seen(self) -> int:
        return self.sampler.consumed

    @torch.no_grad()
    def evaluate(self, x, labels) -> list[dict]:
        """Per replica (seed-major, see replica()): cross-entropy loss (nats, mean) and error (%)
        on (x, labels)."""
        return [{"loss": r["loss"], "error": r["error"]}
                for r in self.pop.evaluate(np.asarray(x), np.asarray(labels), "ce")]
