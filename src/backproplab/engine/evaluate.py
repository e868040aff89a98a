"""Evaluate a population of Net1989 replicas (no autograd)."""
import numpy as np
import torch
import torch.nn.functional as F

from ..models.net1989 import H2_TABLE, PARAM_NAMES, activation


def _stack(params, name):
    return torch.stack([torch.as_tensor(np.asarray(p[name])) for p in params])


@torch.no_grad()
def population_outputs(params, x: torch.Tensor, act="tanh", out_act="tanh", chunk=512, kernel=None) -> torch.Tensor:
    """params: R dicts; x (B, 1, 16, 16) -> outputs (R, B, 10).

    kernel None: the numba evaluation kernel (engine/_kernels_eval.py, all replicas in one call)
    where this CPU and the activations allow it, else torch; True: the kernel or an error; False: torch.
    Torch: one replica at a time with dense convolutions, in chunks that stay in cache: on one CPU
    thread this took a third of the CPU time of one grouped convolution over 4 or 8 replicas."""
    if kernel is not False and len(params):
        from .kernelgrad import net_outputs, outputs_reason
        why = outputs_reason(act, out_act)
        if why is None:
            W = np.stack([np.concatenate([np.asarray(p[n], np.float32).reshape(-1) for n in PARAM_NAMES])
                          for p in params])
            return net_outputs(W, x, act, out_act)
        if kernel:
            raise RuntimeError(why)
    f = activation(act)
    rows = torch.arange(12).unsqueeze(1)
    outs = []
    for p in params:
        w1, b1 = torch.as_tensor(np.asarray(p["h1_w"])), torch.as_tensor(np.asarray(p["h1_b"]))
        w2 = torch.zeros(12, 12, 5, 5)
        w2[rows, torch.from_numpy(H2_TABLE)] = torch.as_tensor(np.asarray(p["h2_w"]))
        b2 = torch.as_tensor(np.asarray(p["h2_b"]))
        w3, b3 = torch.as_tensor(np.asarray(p["h3_w"])), torch.as_tensor(np.asarray(p["h3_b"]))
        wo, bo = torch.as_tensor(np.asarray(p["out_w"])), torch.as_tensor(np.asarray(p["out_b"]))
        rep = []
        for s in range(0, len(x), chunk):
            h = F.pad(x[s:s + chunk], (2, 2, 2, 2), value=-1.0)               # (B, 1, 20, 20)
            h = F.pad(f(F.conv2d(h, w1, stride=2) + b1), (2, 2, 2, 2), value=-1.0)  # (B, 12, 12, 12)
            h = f(F.conv2d(h, w2, stride=2) + b2).flatten(1)                   # (B, 192)
            h = f(torch.addmm(b3, h, w3.t()))                                  # (B, 30)
            rep.append(torch.addmm(bo, h, wo.t()))                             # (B, 10)
        o = torch.cat(rep)
        outs.append(o if out_act == "none" else activation(out_act)(o))
    return torch.stack(outs)


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
    """One replica's outputs (B, 10) for any registered model; the model is built at x's side
    (data.resolution)."""
    if cfg_model.name == "net1989":
        return population_outputs([params], x, cfg_model.act, cfg_model.out_act)[0]
    from ..models.registry import build_model
    m = build_model(cfg_model, 0, int(x.shape[-1]))
    m.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()})
    m.eval()
    return m(x)
