"""The 1989 optimizer's Hessian estimate against exact Gauss-Newton diagonals from autograd."""
import pytest
import torch
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


def test_update_rule_formula():
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    h, new = torch.tensor([0.1, 0.0]), torch.tensor([1.0, 3.0])
    sdlm_update(p, g, h, new, lr=0.01, mu=0.02, gamma=0.1)
    torch.testing.assert_close(h, torch.tensor([0.19, 0.3]))
    torch.testing.assert_close(p, torch.tensor([1.0 - 0.01 * 0.5 / 0.21, -2.0 - 0.01 * 0.25 / 0.32]))
