"""Minibatch engine: R replicas of any registry model, torch.optim SGD or AdamW.

All weights of all replicas live in one (R, n_params) buffer W; each replica's module
and the per-name (R, ...) views alias it. SGD and AdamW are elementwise, so one
torch.optim optimizer over W is exactly R independent optimizers (they all step
together, so the shared step count is right) and costs a few ops per step, not a few
per parameter tensor. With vectorize, the forward runs once for all replicas under
torch.func.vmap over the replica axis and autograd differentiates the batched ops
(cheaper here than vmap(grad)); otherwise a plain autograd loop over the replicas, the
reference path. Both give the same numbers up to float rounding.

Batches are a stream: examples are consumed in the order train_pass receives them and
an update happens every `batch` examples; a partial batch at the end of a call waits
(the carry-over, part of state()) for the next call, also across passes. So the
updates do not depend on how a pass is cut into chunks, and batch=1 is the per-example
engine. end_pass() trains the carry-over as a smaller batch for callers that want
batches aligned to passes. The lr of a batch is the lr of its first example.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..data.augment import shift_images
from ..errors import UserError
from ..models.registry import build_model, dropout_units
from .evaluate import metrics_from_outputs

EVAL_CHUNK = 2048  # images per forward pass in evaluate()
# Replicas from which the vmap path is faster than the loop (one thread, batch 32, this
# repo's benchmark): the ViT's small matmuls batch well (R=8: 0.5x the loop's time per
# replica); net1989's vmapped convolutions and connection-table scatter only pay off late.
VECTORIZE_FROM = {"vit": 2, "net1989": 8}


def batch_loss(out: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """out (..., B, 10), labels (B,) -> (...) mean over the batch of the per-example loss."""
    if loss == "mse":  # mean over the 10 outputs against -1 / +1 targets
        target = 2.0 * F.one_hot(labels, 10).to(out.dtype) - 1.0
        return torch.mean((out - target) ** 2, dim=(-2, -1))
    per = F.cross_entropy(out.reshape(-1, 10), labels.repeat(out.numel() // (10 * len(labels))), reduction="none")
    return per.reshape(out.shape[:-1]).mean(-1)


class MinibatchPopulation:
    def __init__(self, cfg, seeds, vectorize=None):
        m, o, t = cfg.model, cfg.optim, cfg.train
        if o.name not in ("sgd", "adamw"):
            raise UserError(f"optim.name={o.name} is per-example only; use train.engine=fast or eager")
        if t.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available on this machine")
        self.device, self.batch, self.loss = torch.device(t.device), int(t.batch), t.loss
        self.R, self.dropout = len(seeds), m.dropout
        self.dropout_units = dropout_units(m)
        if vectorize is None:
            vectorize = self.R >= VECTORIZE_FROM.get(m.name, 2)
        self.vectorize = bool(vectorize)
        self.models = [build_model(m, s).to(self.device) for s in seeds]
        self.names = [n for n, _ in self.models[0].named_parameters()]
        shapes = [p.shape for p in self.models[0].parameters()]
        sizes = [p.numel() for p in self.models[0].parameters()]
        # W (R, n_params): row r is replica r's parameters, flattened in named_parameters order
        self.W = torch.stack([torch.cat([p.detach().reshape(-1) for p in mod.parameters()])
                              for mod in self.models])
        cols = np.cumsum([0] + sizes)
        self.views = {n: self.W[:, a:b].view(self.R, *sh)  # (R, *shape) views of W
                      for n, a, b, sh in zip(self.names, cols[:-1], cols[1:], shapes)}
        for r, mod in enumerate(self.models):  # each replica's module now aliases its row of W
            for n, p in mod.named_parameters():
                p.data = self.views[n][r]
        if o.name == "sgd":  # like the per-example engines: plain SGD, weight_decay unused
            self.opt = torch.optim.SGD([self.W], lr=o.lr)
        else:
            self.opt = torch.optim.AdamW([self.W], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                         weight_decay=o.weight_decay)
        # vmap of the forward only: autograd then runs on the batched ops, cheaper than vmap(grad)
        fwd = lambda prm, xb, kb: functional_call(self.models[0], prm, (xb, kb))  # noqa: E731
        self._vfwd = {True: vmap(fwd, in_dims=(0, 0, 0)), False: vmap(fwd, in_dims=(0, 0, None))}
        self.pending = None  # carry-over: (x (R, k, 1, 16, 16), labels (k,), lr (k,) float32, keep (R, k, U))

    # -- training -------------------------------------------------------------------------
    def train_pass(self, x, labels, lr, shifts=None, keep=None):
        """x (n, 16, 16) float32; labels (n,); lr (n,) per example; shifts (R, n, 2); keep (R, n, U)."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, 1, 16, 16)
        n = len(x)
        if shifts is not None:
            xs = torch.stack([shift_images(x, shifts[r]) for r in range(self.R)])  # (R, n, 1, 16, 16)
        else:
            xs = x.unsqueeze(0).expand(self.R, -1, -1, -1, -1)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        lr = np.asarray(lr, dtype=np.float32).reshape(n)
        if keep is not None:
            keep = torch.as_tensor(np.asarray(keep), dtype=torch.bool)
            if keep.shape != (self.R, n, self.dropout_units):
                raise ValueError(f"keep masks {tuple(keep.shape)}, expected {(self.R, n, self.dropout_units)}")
        elif self.dropout > 0:
            raise ValueError("dropout needs the caller's keep masks (train() draws them from the pass stream)")
        if self.pending is not None:
            px, pl, plr, pk = self.pending
            xs, labels, lr = torch.cat([px, xs], 1), torch.cat([pl, labels]), np.concatenate([plr, lr])
            keep = None if keep is None else torch.cat([pk, keep], 1)
            self.pending = None
        total = len(labels)
        full = total - total % self.batch
        xs_dev, lab_dev = xs[:, :full].to(self.device), labels[:full].to(self.device)
        keep_dev = None if keep is None else keep[:, :full].to(self.device)
        for a in range(0, full, self.batch):
            b = a + self.batch
            self._step(xs_dev[:, a:b], lab_dev[a:b], float(lr[a]), None if keep is None else keep_dev[:, a:b])
        if full < total:  # copies, so the carry-over does not pin the whole chunk
            self.pending = (xs[:, full:].clone(), labels[full:].clone(), lr[full:].copy(),
                            None if keep is None else keep[:, full:].clone())

    def end_pass(self):
        """Train the carry-over now as one smaller batch (batches aligned to passes)."""
        if self.pending is not None:
            px, pl, plr, pk = self.pending
            self.pending = None
            self._step(px.to(self.device), pl.to(self.device), float(plr[0]),
                       None if pk is None else pk.to(self.device))

    def _step(self, x, labels, lr, keep):  # x (R, B, 1, 16, 16), labels (B,), keep (R, B, U) or None
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.vectorize:  # modules stay in train mode except inside outputs()
            leaves = {n: v.detach().requires_grad_() for n, v in self.views.items()}  # share W's storage
            out = self._vfwd[keep is not None](leaves, x, keep)                      # (R, B, 10)
            grads = torch.autograd.grad(batch_loss(out, labels, self.loss).sum(), list(leaves.values()))
            self.W.grad = torch.cat([g.reshape(self.R, -1) for g in grads], 1)
        else:  # reference path: plain autograd, one replica after another
            rows = []
            for r, mod in enumerate(self.models):
                loss = batch_loss(mod(x[r], None if keep is None else keep[r]), labels, self.loss)
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(mod.parameters()))]))
            self.W.grad = torch.stack(rows)
        self.opt.step()

    # -- evaluation and state -------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 16, 16) -> outputs (R, B, 10) in eval mode (no dropout).

        A loop over replicas even when training is vectorized: with thousands of images
        per call the ops are large already and vmap only adds overhead (measured).
        """
        x = x.reshape(-1, 1, 16, 16).to(self.device)
        outs = []
        for mod in self.models:
            mod.eval()
            outs.append(torch.cat([mod(x[s:s + EVAL_CHUNK]) for s in range(0, len(x), EVAL_CHUNK)]))
            mod.train()
        return torch.stack(outs).cpu()

    def evaluate(self, x, labels, loss) -> list:
        return metrics_from_outputs(self.outputs(x), torch.as_tensor(labels).cpu(), loss)

    def params(self) -> list:
        return [{n: self.views[n][r].cpu().numpy().copy() for n in self.names} for r in range(self.R)]

    def state(self) -> dict:
        out = {f"p.{n}": self.views[n].cpu().numpy().copy() for n in self.names}  # (R, ...) each
        for k, v in self.opt.state.get(self.W, {}).items():  # AdamW: step, exp_avg / exp_avg_sq (R, n_params)
            out[f"opt.{k}"] = v.detach().cpu().numpy().copy() if torch.is_tensor(v) else np.asarray(v)
        if self.pending is not None:
            px, pl, plr, pk = self.pending
            out.update({"pending.x": px.numpy().copy(), "pending.labels": pl.numpy().copy(),
                        "pending.lr": plr.copy()})
            if pk is not None:
                out["pending.keep"] = pk.numpy().copy()
        return out

    def load_state(self, state: dict) -> None:
        missing = [f"p.{n}" for n in self.names if f"p.{n}" not in state]
        if missing:
            raise UserError(f"checkpoint does not fit this model: missing {', '.join(missing[:3])}")
        with torch.no_grad():
            for n in self.names:
                self.views[n].copy_(torch.as_tensor(np.asarray(state[f"p.{n}"])))
        self.opt.state.clear()
        st = {k[4:]: torch.as_tensor(np.asarray(v)).clone() for k, v in state.items() if k.startswith("opt.")}
        if st:  # AdamW keeps `step` as a 0-d float32 CPU tensor (checkpoints may make it 1-d), moments beside W
            self.opt.state[self.W] = {k: (v.float().reshape(()) if k == "step" else v.to(self.device))
                                      for k, v in st.items()}
        self.pending = None
        if "pending.x" in state:
            pk = state.get("pending.keep")
            self.pending = (torch.as_tensor(np.asarray(state["pending.x"])).clone(),
                            torch.as_tensor(np.asarray(state["pending.labels"])).clone(),
                            np.asarray(state["pending.lr"], dtype=np.float32).copy(),
                            None if pk is None else torch.as_tensor(np.asarray(pk)).clone())
