"""Evaluate a population of Net1989 replicas at once (grouped convolutions, no autograd)."""
import numpy as np
import torch
import torch.nn.functional as F

from ..models.net1989 import H2_TABLE, activation


def _stack(params, name):
    return torch.stack([torch.as_tensor(np.asarray(p[name])) for p in params])


@torch.no_grad()
def population_outputs(params, x: torch.Tensor, act="tanh", out_act="tanh", chunk=4096) -> torch.Tensor:
    """params: R dicts; x (B, 1, 16, 16) -> outputs (R, B, 10)."""
    R, f = len(params), activation(act)
    w1 = _stack(params, "h1_w").reshape(R * 12, 1, 5, 5)
    b1 = _stack(params, "h1_b").reshape(1, R * 12, 8, 8)
    w2 = torch.zeros(R, 12, 12, 5, 5)
    w2[:, torch.arange(12).unsqueeze(1), torch.from_numpy(H2_TABLE)] = _stack(params, "h2_w")
    w2 = w2.reshape(R * 12, 12, 5, 5)
    b2 = _stack(params, "h2_b").reshape(1, R * 12, 4, 4)
    w3, b3 = _stack(params, "h3_w"), _stack(params, "h3_b")      # (R, 30, 192), (R, 30)
    wo, bo = _stack(params, "out_w"), _stack(params, "out_b")    # (R, 10, 30), (R, 10)
    outs = []
    for s in range(0, len(x), chunk):
        xb = F.pad(x[s:s + chunk], (2, 2, 2, 2), value=-1.0)     # (B, 1, 20, 20)
        B = len(xb)
        h = f(F.conv2d(xb.expand(B, R, 20, 20), w1, stride=2, groups=R) + b1)  # (B, R*12, 8, 8)
        h = F.pad(h, (2, 2, 2, 2), value=-1.0)
        h = f(F.conv2d(h, w2, stride=2, groups=R) + b2)           # (B, R*12, 4, 4)
        h = h.reshape(B, R, 192).transpose(0, 1)                  # (R, B, 192)
        h = f(torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2)))  # (R, B, 30)
        o = torch.baddbmm(bo.unsqueeze(1), h, wo.transpose(1, 2))      # (R, B, 10)
        outs.append(o if out_act == "none" else activation(out_act)(o))
    return torch.cat(outs, dim=1)


def metrics_from_outputs(out: torch.Tensor, labels: torch.Tensor, loss: str) -> list[dict]:
    """out (R, B, 10) -> per replica {loss, error (percent), misses}."""
    R, B, _ = out.shape
    if loss == "mse":
        target = torch.full((B, 10), -1.0)
        target[torch.arange(B), labels] = 1.0
        losses = ((out - target) ** 2).mean(dim=(1, 2))
    else:
        losses = torch.stack([F.cross_entropy(out[r], labels) for r in range(R)])
    misses = (out.argmax(dim=2) != labels.unsqueeze(0)).sum(dim=1)
    return [{"loss": float(losses[r]), "misses": int(misses[r]), "error": 100.0 * int(misses[r]) / B}
            for r in range(R)]


def evaluate(params, x, labels, act="tanh", out_act="tanh", loss="mse") -> list[dict]:
    return metrics_from_outputs(population_outputs(params, x, act, out_act), labels, loss)


@torch.no_grad()
def predict(cfg_model, params: dict, x: torch.Tensor) -> torch.Tensor:
    """One replica's outputs (B, 10) for any registered model."""
    if cfg_model.name == "net1989":
        return population_outputs([params], x, cfg_model.act, cfg_model.out_act)[0]
    from ..models.registry import build_model
    m = build_model(cfg_model, 0)
    m.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()})
    m.eval()
    return m(x)
