"""The 1989 optimizer's Hessian estimate: every layer against LeCun's diagonal estimate written out
unit by unit, the top layers also against exact Gauss-Newton diagonals from autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from backproplab.methods.sdlm import net1989_gn_diag, sdlm_update
from backproplab.models import Net1989


def exact_gn_diag(model, x, loss):
    """diag(J^T H_L J) with J = d outputs / d params (autograd) and H_L the loss Hessian in outputs."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    y = functional_call(model, params, (x,))[0]
    J = jacrev(lambda p: functional_call(model, p, (x,))[0])(params)  # name -> (10, *shape)
    if loss == "mse":
        H = torch.eye(10) * (2.0 / 10.0)
    else:
        p = torch.softmax(y, 0)
        H = torch.diag(p) - torch.outer(p, p)
    out = {}
    for n, j in J.items():
        jf = j.reshape(10, -1)
        out[n] = torch.einsum("oi,op,pi->i", jf, H, jf).reshape(j.shape[1:])
    return out


@pytest.mark.parametrize("act,out_act,loss", [("tanh", "tanh", "mse"), ("scaled_tanh", "scaled_tanh", "mse")])
def test_exact_for_the_top_two_layers(act, out_act, loss):
    torch.manual_seed(0)
    m, x = Net1989(3, act=act, out_act=out_act), torch.rand(1, 1, 16, 16) * 2 - 1
    est = net1989_gn_diag({n: p.detach() for n, p in m.params().items()}, x, act, out_act, loss)
    exact = exact_gn_diag(m, x, loss)
    for n in ("out_w", "out_b", "h3_w", "h3_b"):
        torch.testing.assert_close(est[n], exact[n], rtol=1e-5, atol=1e-9)
    for n in ("h1_w", "h1_b", "h2_w", "h2_b"):  # estimates, not exact: positive and the right shape
        assert est[n].shape == exact[n].shape and torch.all(est[n] >= 0) and est[n].sum() > 0


def test_exact_on_a_single_path_net():
    """One output and one H3 unit: every H2 unit reaches the loss by one path, so the H2
    bias estimate has no cross terms to drop and must equal the exact Gauss-Newton value."""
    torch.manual_seed(1)
    m, x = Net1989(5), torch.rand(1, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        m.out_w.zero_()
        m.out_w[4, 7] = 1.3
        m.h3_w[torch.arange(30) != 7] = 0.0
    est = net1989_gn_diag({n: p.detach() for n, p in m.params().items()}, x, "tanh", "tanh", "mse")
    exact = exact_gn_diag(m, x, "mse")
    for n in ("h2_b", "h3_w", "h3_b", "out_w", "out_b"):
        torch.testing.assert_close(est[n], exact[n], rtol=1e-5, atol=1e-10)


def test_cross_entropy_output_curvature():
    m, x = Net1989(2, act="relu", out_act="none"), torch.rand(1, 1, 16, 16) * 2 - 1
    est = net1989_gn_diag({n: p.detach() for n, p in m.params().items()}, x, "relu", "none", "ce")
    exact = exact_gn_diag(m, x, "ce")
    torch.testing.assert_close(est["out_w"], exact["out_w"], rtol=1e-5, atol=1e-9)


# -- LeCun's diagonal estimate from its definition, unit by unit ---------------------------------
# Efficient BackProp (LeCun, Bottou, Orr & Mueller 1998), section 9.1: the second derivative of
# the loss with respect to each unit's total input a is back-propagated like the gradient, but with
# squared weights and the squared derivative of the activation, and without off-diagonal terms:
#   output:  s = g'(a)^2 d2E/dy2   (mse, mean over the 10 outputs: 2/10; softmax cross-entropy: p (1 - p))
#   hidden:  s_j = f'(a_j)^2 sum over the connections j -> k of w_jk^2 s_k
#   weight:  h_w = sum over the connections that share w of x_in^2 s_out;  bias: h_b = s of its unit
# The net is written out from SPEC section 1 (pads of -1 are inputs without a unit of their own).
SEES = [list(range(0, 8))] * 4 + [list(range(4, 12))] * 4 + [[0, 1, 2, 3, 8, 9, 10, 11]] * 4


def _f(name, a):
    return {"tanh": np.tanh(a), "scaled_tanh": 1.7159 * np.tanh(a * 2 / 3), "relu": np.maximum(a, 0.0),
            "none": a}[name]


def _df(name, a):
    return {"tanh": 1 - np.tanh(a) ** 2, "scaled_tanh": 1.7159 * 2 / 3 * (1 - np.tanh(a * 2 / 3) ** 2),
            "relu": (a > 0).astype(a.dtype), "none": np.ones_like(a)}[name]


def lecun_diag(params, x, act, out_act, loss, keep=None, dropout=0.0):
    """One example x (1, 1, 16, 16) -> {name: estimate shaped like the parameter}, in float64."""
    p = {n: v.detach().double().numpy() for n, v in params.items()}
    P0 = np.pad(x.double().numpy()[0, 0], 2, constant_values=-1.0)    # (20, 20)
    win = lambda t, i, j: t[..., 2 * i:2 * i + 5, 2 * j:2 * j + 5]     # noqa: E731  5x5 window, stride 2
    a1 = np.zeros((12, 8, 8))
    for c, i, j in np.ndindex(12, 8, 8):
        a1[c, i, j] = (win(P0, i, j) * p["h1_w"][c, 0]).sum() + p["h1_b"][c, i, j]
    P1 = np.pad(_f(act, a1), ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)  # (12, 12, 12)
    a2 = np.zeros((12, 4, 4))
    for o, i, j in np.ndindex(12, 4, 4):
        a2[o, i, j] = sum((win(P1[k], i, j) * p["h2_w"][o, s]).sum() for s, k in enumerate(SEES[o])) + p["h2_b"][o, i, j]
    scale = np.ones(192) if keep is None else keep.reshape(192).double().numpy() / (1 - dropout)
    x3 = _f(act, a2).reshape(192) * scale
    a3 = p["h3_w"] @ x3 + p["h3_b"]
    x4 = _f(act, a3)
    a4 = p["out_w"] @ x4 + p["out_b"]
    if loss == "mse":
        s4 = _df(out_act, a4) ** 2 * (2 / 10)
    else:
        q = np.exp(a4 - a4.max())
        q /= q.sum()
        s4 = q * (1 - q)
    s3 = np.array([_df(act, a3[k]) ** 2 * sum(p["out_w"][m, k] ** 2 * s4[m] for m in range(10)) for k in range(30)])
    s2 = np.array([_df(act, a2.reshape(192)[j]) ** 2 * scale[j] ** 2 * sum(p["h3_w"][k, j] ** 2 * s3[k] for k in range(30))
                   for j in range(192)]).reshape(12, 4, 4)
    h2_w, sP1 = np.zeros((12, 8, 5, 5)), np.zeros((12, 12, 12))
    for o, i, j in np.ndindex(12, 4, 4):
        for s, k in enumerate(SEES[o]):
            h2_w[o, s] += win(P1[k], i, j) ** 2 * s2[o, i, j]
            win(sP1[k], i, j)[...] += p["h2_w"][o, s] ** 2 * s2[o, i, j]
    s1 = _df(act, a1) ** 2 * sP1[:, 2:10, 2:10]                         # pads have no unit: dropped
    h1_w = np.zeros((12, 1, 5, 5))
    for c, i, j in np.ndindex(12, 8, 8):
        h1_w[c, 0] += win(P0, i, j) ** 2 * s1[c, i, j]
    out = {"h1_w": h1_w, "h1_b": s1, "h2_w": h2_w, "h2_b": s2, "h3_w": s3[:, None] * x3[None, :] ** 2,
           "h3_b": s3, "out_w": s4[:, None] * x4[None, :] ** 2, "out_b": s4}
    return {n: torch.from_numpy(v).float() for n, v in out.items()}


VARIANTS = [("tanh", "tanh", "mse", None), ("scaled_tanh", "scaled_tanh", "mse", None),
            ("relu", "none", "ce", None), ("tanh", "none", "ce", 0.25)]


@pytest.mark.parametrize("act,out_act,loss,dropout", VARIANTS)
def test_every_layer_is_lecuns_diagonal_estimate(act, out_act, loss, dropout):
    m, x = Net1989(4, act=act, out_act=out_act), torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    p = {n: v.detach() for n, v in m.params().items()}
    keep = None if dropout is None else torch.rand(1, 192, generator=torch.Generator().manual_seed(3)) >= dropout
    est = net1989_gn_diag(p, x, act, out_act, loss, keep, dropout or 0.0)
    want = lecun_diag(p, x, act, out_act, loss, keep, dropout or 0.0)
    assert list(est) == list(want)
    for n in want:  # all eight tensors, each against its definition
        assert want[n].min() >= 0 and want[n].max() > 0
        torch.testing.assert_close(est[n], want[n], rtol=1e-4, atol=1e-7 * float(want[n].max()),
                                   msg=lambda s, n=n: f"{n}: {s}")


def test_update_rule_formula():
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    h, new = torch.tensor([0.1, 0.0]), torch.tensor([1.0, 3.0])
    sdlm_update(p, g, h, new, lr=0.01, mu=0.02, gamma=0.1)
    torch.testing.assert_close(h, torch.tensor([0.19, 0.3]))
    torch.testing.assert_close(p, torch.tensor([1.0 - 0.01 * 0.5 / 0.21, -2.0 - 0.01 * 0.25 / 0.32]))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_batch_estimate_is_the_sum_of_its_examples(dropout):
    """The batched call (one forward and squared backward for the whole batch) sums what each
    example alone gives, dropout masks included."""
    torch.manual_seed(4)
    m, x = Net1989(6, act="relu", out_act="none"), torch.rand(5, 1, 16, 16) * 2 - 1
    p = {n: q.detach() for n, q in m.params().items()}
    keep = (torch.rand(5, 192) > dropout) if dropout else None
    batch = net1989_gn_diag(p, x, "relu", "none", "ce", keep, dropout)
    for n, v in batch.items():
        one = sum(net1989_gn_diag(p, x[i:i + 1], "relu", "none", "ce", None if keep is None else keep[i:i + 1],
                                  dropout)[n] for i in range(5))
        torch.testing.assert_close(v, one, rtol=1e-5, atol=1e-9)
