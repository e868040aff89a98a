"""The reference engine: plain nn/autograd, batch of one, torch.optim.

This defines the semantics the fast engine must match; it is slow on purpose (about
2 ms a step) and runs on any device torch supports.
"""
import numpy as np
import torch
import torch.nn.functional as F

from ..models.net1989 import PARAM_NAMES, Net1989


def example_loss(yhat: torch.Tensor, label: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":  # mean over the 10 outputs against +-1 targets
        target = torch.full_like(yhat, -1.0)
        target[torch.arange(len(label)), label] = 1.0
        return torch.mean((yhat - target) ** 2)
    return F.cross_entropy(yhat, label)


class EagerPopulation:
    """R replicas, each an nn.Module with its own torch.optim optimizer, trained in turn."""

    def __init__(self, params, act="tanh", out_act="tanh", loss="mse", optim="sgd", weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, dropout=0.0, device="cpu", mu=0.02, gamma=0.01):
        self.loss, self.device, self.optim = loss, torch.device(device), optim
        self.act, self.out_act, self.dropout, self.mu, self.gamma = act, out_act, dropout, mu, gamma
        self.h = []  # sdlm: running Gauss-Newton diagonal per replica
        self.models, self.opts = [], []
        for p in params:
            m = Net1989(0, act=act, out_act=out_act, dropout=dropout)
            with torch.no_grad():
                for n in PARAM_NAMES:
                    getattr(m, n).copy_(torch.as_tensor(np.asarray(p[n])))
            m.to(self.device)
            if optim in ("sgd", "sdlm"):
                opt = torch.optim.SGD(m.parameters(), lr=1.0)
                self.h.append({n: torch.zeros_like(getattr(m, n)) for n in PARAM_NAMES})
            else:
                opt = torch.optim.AdamW(m.parameters(), lr=1.0, betas=betas, eps=eps, weight_decay=weight_decay)
            self.models.append(m)
            self.opts.append(opt)

    def train_pass(self, x, labels, lr, shifts=None, keep=None):
        from ..data.augment import shift_images
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, 1, 16, 16)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        for r, (m, opt) in enumerate(zip(self.models, self.opts)):
            xr = shift_images(x, shifts[r]) if shifts is not None else x
            xr, lab = xr.to(self.device), labels.to(self.device)
            kr = torch.as_tensor(keep[r]).to(self.device) if keep is not None else None
            m.train()
            for i in range(len(xr)):
                for g in opt.param_groups:
                    g["lr"] = float(lr[i])
                opt.zero_grad(set_to_none=True)
                yhat = m(xr[i:i + 1], None if kr is None else kr[i:i + 1])
                example_loss(yhat, lab[i:i + 1], self.loss).backward()
                if self.optim == "sdlm":
                    self._sdlm_step(r, xr[i:i + 1], None if kr is None else kr[i:i + 1], float(lr[i]))
                else:
                    opt.step()

    def _sdlm_step(self, r, x, keep, lr):
        from ..methods.sdlm import net1989_gn_diag, sdlm_update
        m = self.models[r]
        p = {n: getattr(m, n).detach() for n in PARAM_NAMES}
        est = net1989_gn_diag(p, x, self.act, self.out_act, self.loss, keep, self.dropout)
        with torch.no_grad():
            for n in PARAM_NAMES:
                sdlm_update(p[n], getattr(m, n).grad, self.h[r][n], est[n], lr, self.mu, self.gamma)

    def params(self):
        return [{n: getattr(m, n).detach().cpu().numpy().copy() for n in PARAM_NAMES} for m in self.models]

    def state(self) -> dict:
        out = {}
        for r, (m, opt) in enumerate(zip(self.models, self.opts)):
            for n in PARAM_NAMES:
                out[f"{r}.{n}"] = getattr(m, n).detach().cpu().numpy().copy()
            for n, v in (self.h[r].items() if self.optim == "sdlm" else ()):
                out[f"{r}.h.{n}"] = v.detach().cpu().numpy().copy()
            for i, p in enumerate(m.parameters()):
                for k, v in opt.state.get(p, {}).items():
                    out[f"{r}.opt.{i}.{k}"] = v.detach().cpu().numpy().copy() if torch.is_tensor(v) \
                        else np.asarray(v)
        return out

    def load_state(self, state: dict) -> None:
        for r, (m, opt) in enumerate(zip(self.models, self.opts)):
            with torch.no_grad():
                for n in PARAM_NAMES:
                    getattr(m, n).copy_(torch.as_tensor(state[f"{r}.{n}"]))
                    if self.optim == "sdlm":
                        self.h[r][n].copy_(torch.as_tensor(state[f"{r}.h.{n}"]))
            for i, p in enumerate(m.parameters()):
                prefix = f"{r}.opt.{i}."
                st = {k[len(prefix):]: torch.as_tensor(v).to(self.device) for k, v in state.items()
                      if k.startswith(prefix)}
                if st:
                    if "step" in st:
                        st["step"] = st["step"].float().cpu()
                    opt.state[p] = st
