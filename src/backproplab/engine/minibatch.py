"""Minibatch engine: R replicas of any registry model, torch.optim SGD or AdamW.

The replicas' parameters live stacked, one (R, ...) tensor per parameter name. SGD and
AdamW are elementwise, so one torch.optim optimizer over the stacked tensors is exactly
R independent optimizers (they all step together, so the shared step count is right).
Gradients come from torch.func: vmap(grad(loss)) over the replica axis, so R models
cost one batched forward/backward; with R = 1 (or vectorize=False) a plain autograd
loop over replicas gives the same numbers and is the reference path.

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
from torch.func import functional_call, grad, vmap

from ..data.augment import shift_images
from ..errors import UserError
from ..models.registry import build_model, dropout_units
from .evaluate import metrics_from_outputs

EVAL_CHUNK = 2048  # images per forward pass in evaluate()


def batch_loss(out: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """out (B, 10), labels (B,) -> mean over the batch of the per-example loss."""
    if loss == "mse":  # mean over the 10 outputs against -1 / +1 targets
        target = 2.0 * F.one_hot(labels, 10).to(out.dtype) - 1.0
        return torch.mean((out - target) ** 2)
    return F.cross_entropy(out, labels)


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
        self.vectorize = self.R > 1 if vectorize is None else bool(vectorize)
        models = [build_model(m, s) for s in seeds]
        self.base = models[0].to(self.device)   # the functional template; its own weights are unused
        self.names = [n for n, _ in self.base.named_parameters()]
        # name -> (R, ...) leaf tensor, the optimizer's parameters
        self.P = {n: torch.stack([dict(mod.named_parameters())[n].detach() for mod in models])
                  .to(self.device).requires_grad_(True) for n in self.names}
        leaves = [self.P[n] for n in self.names]
        if o.name == "sgd":  # like the per-example engines: plain SGD, weight_decay unused
            self.opt = torch.optim.SGD(leaves, lr=o.lr)
        else:
            self.opt = torch.optim.AdamW(leaves, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                         weight_decay=o.weight_decay)
        self._grad = grad(self._replica_loss)
        self._vgrad = {True: vmap(self._grad, in_dims=(0, 0, None, 0)),
                       False: vmap(self._grad, in_dims=(0, 0, None, None))}
        self.pending = None  # carry-over: (x (R, k, 1, 16, 16), labels (k,), lr (k,) float32, keep (R, k, U))

    def _replica_loss(self, params, x, labels, keep):  # one replica: x (B, 1, 16, 16), keep (B, U)
        return batch_loss(functional_call(self.base, params, (x, keep)), labels, self.loss)

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
        self.base.train()
        if self.vectorize:
            params = {n: p.detach() for n, p in self.P.items()}
            grads = self._vgrad[keep is not None](params, x, labels, keep)
            for n in self.names:
                self.P[n].grad = grads[n]
        else:  # reference path: one autograd graph per replica, grads land in the stacked leaves
            for p in self.P.values():
                p.grad = None
            total = 0.0
            for r in range(self.R):
                params = {n: self.P[n][r] for n in self.names}
                total = total + self._replica_loss(params, x[r], labels, None if keep is None else keep[r])
            total.backward()
        self.opt.step()

    # -- evaluation and state -------------------------------------------------------------
    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 16, 16) -> outputs (R, B, 10) in eval mode (no dropout)."""
        self.base.eval()
        x = x.reshape(-1, 1, 16, 16).to(self.device)
        params = {n: p.detach() for n, p in self.P.items()}
        fwd = vmap(lambda prm, xb: functional_call(self.base, prm, (xb,)), in_dims=(0, None))
        outs = []
        for s in range(0, len(x), EVAL_CHUNK):
            xb = x[s:s + EVAL_CHUNK]
            if self.vectorize:
                outs.append(fwd(params, xb))
            else:
                outs.append(torch.stack([functional_call(self.base, {n: params[n][r] for n in self.names}, (xb,))
                                         for r in range(self.R)]))
        self.base.train()
        return torch.cat(outs, 1).cpu()

    def evaluate(self, x, labels, loss) -> list:
        return metrics_from_outputs(self.outputs(x), torch.as_tensor(labels).cpu(), loss)

    def params(self) -> list:
        return [{n: self.P[n][r].detach().cpu().numpy().copy() for n in self.names} for r in range(self.R)]

    def state(self) -> dict:
        out = {f"p.{n}": self.P[n].detach().cpu().numpy().copy() for n in self.names}
        for n in self.names:
            for k, v in self.opt.state.get(self.P[n], {}).items():
                out[f"opt.{n}.{k}"] = v.detach().cpu().numpy().copy() if torch.is_tensor(v) else np.asarray(v)
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
                self.P[n].copy_(torch.as_tensor(np.asarray(state[f"p.{n}"])))
        self.opt.state.clear()
        for n in self.names:
            prefix = f"opt.{n}."
            st = {k[len(prefix):]: torch.as_tensor(np.asarray(v)).clone() for k, v in state.items() if k.startswith(prefix)}
            if st:  # AdamW keeps `step` as a float32 CPU scalar, moments on the parameter's device
                self.opt.state[self.P[n]] = {k: (v.float() if k == "step" else v.to(self.device))
                                             for k, v in st.items()}
        self.pending = None
        if "pending.x" in state:
            pk = state.get("pending.keep")
            self.pending = (torch.as_tensor(np.asarray(state["pending.x"])).clone(),
                            torch.as_tensor(np.asarray(state["pending.labels"])).clone(),
                            np.asarray(state["pending.lr"], dtype=np.float32).copy(),
                            None if pk is None else torch.as_tensor(np.asarray(pk)).clone())
