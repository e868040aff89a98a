"""Train one study cell: R learning rates of one model at once, a population on the one engine.

All R replicas start from the same weights (one init seed: the learning rate is the only
difference) and see the same batches. The cell is a Population (engine/population.py) of R
copies of the seed with one peak rate each, and the recipe is made of registered methods,
decayed by a cosine over the run's own number of steps (seed 002: the schedule scaled to
each run's length):
  sgd    momentum (torch.optim.SGD's buf = mu buf + g, w -= lr buf), weight decay as the l2
         method (coupled, the gradient gains wd w): the convnet default, as seed 002's NFNets;
  adamw  torch.optim.AdamW's update (the ViT default: SGD trains the micro-ViT badly, and seed
         002 compares each family under its own usual recipe).
`methods` adds any other registered method to a cell (`scale run +method=NAME`).

Batches come from the exactly-once-per-epoch sampler; a run of `epochs` epochs over n
examples takes examples_for(epochs, n) examples, the last batch smaller if need be.
Checkpoints (the engine's state, the sampler position, the step) are written atomically
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
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0, ckpt=None, ckpt_seconds=60.0,
                 ckpt_steps=None, tag="", methods=()):
        from ..engine.population import Population
        if optim not in ("sgd", "adamw"):
            raise ValueError(f"optim must be sgd or adamw, not {optim!r}")
        self.batch = int(batch)
        self.x, self.labels = x, labels                       # (n, 1, 16, 16) float32, (n,) int64
        self.n = len(labels)
        self.lrs = torch.tensor([float(v) for v in lrs], dtype=torch.float32)      # (R,)
        self.R = len(self.lrs)
        self.total = examples_for(epochs, self.n)             # examples the run takes
        self.steps = math.ceil(self.total / self.batch)
        self.cfg = cell_config(member, optim, batch, momentum, weight_decay, betas, eps, methods)
        self.pop = Population(self.cfg, [seed] * self.R, lrs=self.lrs.tolist())
        self.W = self.pop.W                                    # (R, P), the replicas' weights
        self.sampler = EpochSampler(self.n, seed)
        self.step = 0
        self.ckpt, self.ckpt_seconds, self.ckpt_steps = (Path(ckpt) if ckpt else None), ckpt_seconds, ckpt_steps
        self.tag = tag                                          # identifies the cell in its checkpoint
        self.on_batch = None                                    # hook(step, idx) for tests and logs
        self.resumed_from = 0
        if self.ckpt is not None and has_checkpoint(self.ckpt):
            self._load()

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self):
        save_checkpoint(self.ckpt, {"tag": self.tag, "step": self.step, "engine": self.pop.state(),
                                    "sampler": self.sampler.state_dict(), "lrs": self.lrs.clone(),
                                    "config": self.cfg.to_json()})

    def _load(self):
        st = load_checkpoint(self.ckpt)
        if st.get("tag") != self.tag or st.get("config") != self.cfg.to_json() or "engine" not in st \
                or not torch.equal(st["lrs"], self.lrs):
            return                                              # another cell's or an old layout: start fresh
        self.pop.load_state(to_numpy_state(st["engine"]))
        self.sampler.load_state_dict({k: int(v) for k, v in st["sampler"].items()})
        self.step = self.resumed_from = int(st["step"])

    # -- training -------------------------------------------------------------------------
    def run(self, stop_after=None):
        """Train to the end (or `stop_after` more steps); -> seconds spent here."""
        t0 = last = time.perf_counter()
        end = self.steps if stop_after is None else min(self.steps, self.step + stop_after)
        while self.step < end:
            k = min(self.batch, self.total - self.sampler.consumed)
            epoch = self.sampler.consumed // self.n             # keys the pass's random streams
            idx = self.sampler.take(k)
            if self.on_batch is not None:
                self.on_batch(self.step, idx)
            self.pop.train_batch(self.x[idx], self.labels[idx], self.steps, epoch, self.x)
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
        """Per replica: cross-entropy loss (nats, mean) and error (%) on (x, labels)."""
        return [{"loss": r["loss"], "error": r["error"]}
                for r in self.pop.evaluate(np.asarray(x), np.asarray(labels), "ce")]
