"""The 1989 paper's optimizer: stochastic diagonal Levenberg-Marquardt (LeCun et al.
"Efficient BackProp", 1998, section 9.1).

Each parameter w gets its own step lr / (mu + h_w), where h_w is a running average of a
positive Gauss-Newton estimate of d2E/dw2, back-propagated like the gradient but with
squares and without the cross terms between units:
  s_out = g'(a)^2 * d2E/dy2          (mse over 10 outputs: d2E/dy2 = 2/10; ce: p(1-p))
  s_in  = f'(a)^2 * sum_k w_k^2 s_k  (one layer down)
  h_w   = sum over connections that share w of s_unit * x^2
This estimate equals the exact Gauss-Newton diagonal for the output and H3 layers of
Net1989 and for any net with one hidden layer and one output (tests check both with
autograd); for the convolutional layers it drops the cross terms between positions.
"""
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from ..models.net1989 import H2_TABLE, activation

DEFAULTS = {"mu": 0.02, "gamma": 0.01}  # LeCun 1998: mu = 0.02; gamma: running-average weight per example


def dact2(name: str, a: torch.Tensor) -> torch.Tensor:
    """f'(a)^2 for the activations Net1989 uses."""
    if name == "tanh":
        return (1 - torch.tanh(a) ** 2) ** 2
    if name == "scaled_tanh":
        return (1.7159 * (2 / 3) * (1 - torch.tanh(a * (2 / 3)) ** 2)) ** 2
    if name == "relu":
        return (a > 0).to(a.dtype)
    if name == "none":
        return torch.ones_like(a)
    raise ValueError(name)


@torch.no_grad()
def net1989_gn_diag(params: dict, x: torch.Tensor, act: str, out_act: str, loss: str,
                    keep: torch.Tensor | None = None, dropout: float = 0.0) -> dict:
    """Examples x (B, 1, 16, 16) -> {name: the sum over the B examples of each one's diagonal
    Gauss-Newton estimate, shaped like the parameter} (B = 1: that example's estimate). keep:
    (B, 192) dropout masks before H3, or None. The estimate is per example and additive, so the
    whole batch goes through one batched forward and one squared backward."""
    f = activation(act)
    B = x.shape[0]
    w2 = params["h2_w"].new_zeros(12, 12, 5, 5)
    w2[torch.arange(12).unsqueeze(1), torch.from_numpy(H2_TABLE)] = params["h2_w"]
    p0 = F.pad(x, (2, 2, 2, 2), value=-1.0)                              # (B, 1, 20, 20)
    a1 = F.conv2d(p0, params["h1_w"], stride=2) + params["h1_b"]        # (B, 12, 8, 8)
    p1 = F.pad(f(a1), (2, 2, 2, 2), value=-1.0)                          # (B, 12, 12, 12)
    a2 = F.conv2d(p1, w2, stride=2) + params["h2_b"]                     # (B, 12, 4, 4)
    x3 = f(a2).reshape(B, 192)
    scale = x3.new_ones(B, 192)
    if keep is not None:
        scale = keep.reshape(B, 192).to(x3.dtype) / (1.0 - dropout)
    x3 = x3 * scale
    a3 = x3 @ params["h3_w"].t() + params["h3_b"]                        # (B, 30)
    x4 = f(a3)
    a4 = x4 @ params["out_w"].t() + params["out_b"]                      # (B, 10)
    if loss == "mse":
        s4 = dact2(out_act, a4) * (2.0 / 10.0)
    else:
        p = torch.softmax(a4, dim=1)
        s4 = p * (1 - p)
    s3 = dact2(act, a3) * (s4 @ params["out_w"] ** 2)                    # (B, 30)
    sx = (s3 @ params["h3_w"] ** 2) * scale ** 2                         # (B, 192)
    s2 = dact2(act, a2) * sx.reshape(B, 12, 4, 4)                        # (B, 12, 4, 4)
    h2_dense = conv2d_weight(p1 ** 2, (12, 12, 5, 5), s2, stride=2)      # (12, 12, 5, 5), summed over B
    sp1 = F.conv_transpose2d(s2, w2 ** 2, stride=2, output_padding=1)    # (B, 12, 12, 12)
    s1 = dact2(act, a1) * sp1[:, :, 2:10, 2:10]                          # (B, 12, 8, 8)
    h1 = conv2d_weight(p0 ** 2, (12, 1, 5, 5), s1, stride=2)
    return {
        "h1_w": h1, "h1_b": s1.sum(0),
        "h2_w": h2_dense[torch.arange(12).unsqueeze(1), torch.from_numpy(H2_TABLE)], "h2_b": s2.sum(0),
        "h3_w": s3.t() @ x3 ** 2, "h3_b": s3.sum(0),
        "out_w": s4.t() @ x4 ** 2, "out_b": s4.sum(0),
    }


def sdlm_update(param: torch.Tensor, grad: torch.Tensor, h_avg: torch.Tensor, h_new: torch.Tensor,
                lr, mu: float, gamma: float) -> None:
    """In place: h_avg <- (1-gamma) h_avg + gamma h_new; param <- param - lr / (mu + h_avg) * grad.
    lr: a float, or a tensor broadcasting over param (a population's (R, 1) column of rates)."""
    h_avg.mul_(1.0 - gamma).add_(h_new, alpha=gamma)
    param.sub_(lr * grad / (mu + h_avg))
