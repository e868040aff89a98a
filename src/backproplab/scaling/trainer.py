"""Train one study cell: R learning rates of one model at once, as a population.

All R replicas start from the same weights (one init seed: the learning rate is the only
difference) and see the same batches. Their weights live in one (R, P) buffer W; the
forward runs once for all replicas under torch.func.vmap (a convolution with a batch of
weights becomes one grouped convolution) and autograd differentiates the batched ops.
Optimizers, each replica with its own peak learning rate, decayed by a cosine over the
run's own number of steps (seed 002: the schedule scaled to each run's length):
  sgd    torch.optim.SGD's update with momentum mu: buf = mu buf + g, w -= lr buf
         (the convnet default, as seed 002's NFNets);
  adamw  torch.optim.AdamW's update (the ViT default: SGD trains the micro-ViT badly,
         and seed 002 compares each family under its own usual recipe).

Batches come from the exactly-once-per-epoch sampler; a run of `epochs` epochs over n
examples takes examples_for(epochs, n) examples, the last batch smaller if need be.
Checkpoints (weights, momentum, step, sampler position) are written atomically every
`ckpt_seconds` (or `ckpt_steps`) and a restarted cell continues from the last one to
the same numbers as an uninterrupted run.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..data.sampler import EpochSampler, examples_for
from ..engine.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint

EVAL_CHUNK = 1024


def cosine_lr(peak: torch.Tensor, step: int, total: int) -> torch.Tensor:
    """lr at step (0-based) of `total`: peak * (1 + cos(pi step / total)) / 2; peak (R,)."""
    return peak * (0.5 * (1.0 + math.cos(math.pi * step / total)))


class CellTrainer:
    def __init__(self, member, lrs, x, labels, epochs: float, *, optim="sgd", batch=32, momentum=0.9,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0, ckpt=None, ckpt_seconds=60.0,
                 ckpt_steps=None, tag=""):
        if optim not in ("sgd", "adamw"):
            raise ValueError(f"optim must be sgd or adamw, not {optim!r}")
        self.optim, self.batch, self.mu, self.wd = optim, int(batch), float(momentum), float(weight_decay)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.x, self.labels = x, labels                       # (n, 1, 16, 16) float32, (n,) int64
        self.n = len(labels)
        self.lrs = torch.tensor([float(v) for v in lrs], dtype=torch.float32)      # (R,)
        self.R = len(self.lrs)
        self.total = examples_for(epochs, self.n)             # examples the run takes
        self.steps = math.ceil(self.total / self.batch)
        self.model = member.build(seed)
        self.names = [k for k, _ in self.model.named_parameters()]
        shapes = [p.shape for p in self.model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        self.W = flat.unsqueeze(0).repeat(self.R, 1).contiguous()                   # (R, P)
        self.buf = torch.zeros_like(self.W)        # sgd: momentum; adamw: first moment (R, P)
        self.sq = torch.zeros_like(self.W) if optim == "adamw" else None              # adamw: second moment
        cols = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        self.views = {k: self.W[:, a:b].view(self.R, *s) for k, a, b, s in zip(self.names, cols[:-1], cols[1:], shapes)}
        self.sampler = EpochSampler(self.n, seed)
        self.step = 0
        self.ckpt, self.ckpt_seconds, self.ckpt_steps = (Path(ckpt) if ckpt else None), ckpt_seconds, ckpt_steps
        self.tag = tag                                          # identifies the cell in its checkpoint
        self.on_batch = None                                    # hook(step, idx) for tests and logs
        self._fwd = vmap(lambda prm, xb: functional_call(self.model, prm, (xb,)), in_dims=(0, None))
        self.resumed_from = 0
        if self.ckpt is not None and has_checkpoint(self.ckpt):
            self._load()

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self):
        st = {"tag": self.tag, "step": self.step, "W": self.W.clone(), "buf": self.buf.clone(),
              "sampler": self.sampler.state_dict(), "lrs": self.lrs.clone()}
        if self.sq is not None:
            st["sq"] = self.sq.clone()
        save_checkpoint(self.ckpt, st)

    def _load(self):
        st = load_checkpoint(self.ckpt)
        if st.get("tag") != self.tag or tuple(st["W"].shape) != tuple(self.W.shape) \
                or not torch.equal(st["lrs"], self.lrs):
            return                                              # another cell's or an old layout: start fresh
        self.W.copy_(st["W"])
        self.buf.copy_(st["buf"])
        if self.sq is not None:
            self.sq.copy_(st["sq"])
        self.sampler.load_state_dict({k: int(v) for k, v in st["sampler"].items()})
        self.step = self.resumed_from = int(st["step"])

    # -- training -------------------------------------------------------------------------
    def _sgd_step(self, xb, yb):
        leaves = {k: v.detach().requires_grad_() for k, v in self.views.items()}   # share W's storage
        out = self._fwd(leaves, xb)                                                 # (R, B, 10)
        loss = F.cross_entropy(out.reshape(-1, 10), yb.repeat(self.R), reduction="none").view(self.R, -1).mean(1)
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        g = torch.cat([gr.reshape(self.R, -1) for gr in grads], 1)                  # (R, P)
        lr = cosine_lr(self.lrs, self.step, self.steps).unsqueeze(1)              # (R, 1)
        if self.optim == "sgd":
            if self.wd:
                g = g + self.wd * self.W
            self.buf.mul_(self.mu).add_(g)
            self.W.sub_(lr * self.buf)
        else:                                   # in torch.optim.AdamW's order of operations
            b1, b2 = self.betas
            t = self.step + 1
            self.W.mul_(1.0 - lr * self.wd)
            self.buf.lerp_(g, 1.0 - b1)
            self.sq.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (self.sq.sqrt() / math.sqrt(1.0 - b2 ** t)).add_(self.eps)
            self.W.sub_(lr / (1.0 - b1 ** t) * self.buf / denom)
        return loss.detach()

    def run(self, stop_after=None):
        """Train to the end (or `stop_after` more steps); -> seconds spent here."""
        t0 = last = time.perf_counter()
        end = self.steps if stop_after is None else min(self.steps, self.step + stop_after)
        while self.step < end:
            k = min(self.batch, self.total - self.sampler.consumed)
            idx = self.sampler.take(k)
            if self.on_batch is not None:
                self.on_batch(self.step, idx)
            self._sgd_step(self.x[idx], self.labels[idx])
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
        tot_loss, miss = torch.zeros(self.R, dtype=torch.float64), torch.zeros(self.R, dtype=torch.long)
        prm = dict(self.views)
        for s in range(0, len(labels), EVAL_CHUNK):
            out = self._fwd(prm, x[s:s + EVAL_CHUNK])                              # (R, b, 10)
            yb = labels[s:s + EVAL_CHUNK]
            ce = F.cross_entropy(out.reshape(-1, 10), yb.repeat(self.R), reduction="none").view(self.R, -1)
            tot_loss += ce.double().sum(1)
            miss += (out.argmax(-1) != yb).sum(1)
        n = len(labels)
        return [{"loss": float(tot_loss[r] / n), "error": 100.0 * int(miss[r]) / n} for r in range(self.R)]
