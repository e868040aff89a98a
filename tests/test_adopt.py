"""ADOPT (Taniguchi et al. 2024) against its update rule written out by hand from the paper, on two
replicas at different rates; a stopped and resumed run equal bit for bit to an uninterrupted one;
bad options refused in one line. 96 digits, batches of 16: 6 steps a pass."""
import pytest
import torch
import torch.nn.functional as F

from backproplab.cli import main
from backproplab.engine.checkpoint import load_checkpoint
from backproplab.engine.kernelgrad import kernel_reason
from backproplab.engine.population import Population
from backproplab.engine.train import checkpoint_path, train
from backproplab.methods.registry import get_method

from conftest import Stop, stop_in
from test_methods import (F32, X, Y, assert_telling, assert_weights, close, flat, grads, init,
                          net, public_run, sgd_steps, tiny_cfg, xy)


def adopt_by_hand(p, g, st, lr, b1=0.9, b2=0.9999, eps=1e-6, clip=True, wd=0.0):
    """One ADOPT step on {name: tensor}, from the paper: v_0 = g_0^2 and no move at t = 0; then
    m_t = b1 m_{t-1} + (1-b1) Clip(g_t / max(sqrt(v_{t-1}), eps), t^(1/4)), w_t = w_{t-1} - lr m_t
    (decoupled decay w (1 - lr wd) first), v_t = b2 v_{t-1} + (1-b2) g_t^2. st: t, m, v."""
    t = st.get("t", 0)
    st["t"] = t + 1
    if t == 0:
        st["v"] = {n: g[n] * g[n] for n in p}
        st["m"] = {n: torch.zeros_like(g[n]) for n in p}
        return {n: p[n].detach().clone() for n in p}
    out = {}
    for n in p:
        w, v_prev = p[n].detach(), st["v"][n]
        u = g[n] / torch.maximum(torch.sqrt(v_prev), torch.tensor(eps))
        if clip:
            c = t ** 0.25
            u = torch.minimum(torch.maximum(u, torch.tensor(-c)), torch.tensor(c))
        st["m"][n] = b1 * st["m"][n] + (1 - b1) * u
        out[n] = w * (1 - lr * wd) - lr * st["m"][n]
        st["v"][n] = b2 * v_prev + (1 - b2) * g[n] * g[n]
    return out


def hand_run(lr, steps=6, batch=16, **opts):
    """Net1989 from seed 0 (the engine's start), `steps` ADOPT steps on consecutive batches of X."""
    m = net()
    p, st = dict(m.named_parameters()), {}
    for a in range(0, steps * batch, batch):
        g = dict(zip(p, torch.autograd.grad(F.cross_entropy(m(X[a:a + batch]), Y[a:a + batch]), list(p.values()))))
        with torch.no_grad():
            for k, v in adopt_by_hand(p, g, st, lr, **opts).items():
                p[k].copy_(v)
    return flat(m)


def rate_column(cfg, lrs, n=96):
    """One pass of n / 16 steps, replicas of seed 0 at the given rates (the engine's (R, 1) rate column)."""
    eng = Population(cfg, [0] * len(lrs), lrs=lrs)
    eng.train_pass(X[:n].reshape(-1, 16, 16).numpy(), Y[:n].numpy(), None)
    eng.end_pass()
    return eng


@pytest.mark.parametrize("spec,opts", [("adopt:weight_decay=0.1", {"wd": 0.1}),
                                       ("adopt:beta1=0.8,beta2=0.99", {"b1": 0.8, "b2": 0.99})])
def test_adopt_equals_the_papers_update_two_replicas_two_rates(spec, opts):
    lr = F32(1e-3)
    eng = rate_column(tiny_cfg(spec, over=[f"optim.lr={lr}"]), [lr, lr / 2])
    if kernel_reason(eng.cfg) is None:
        assert eng.path == "kernel"  # an optimizer runs after the gradient: the numba fast path keeps it
    start = flat(net())
    for r, rate in enumerate((lr, F32(lr / 2))):
        want = hand_run(rate, **opts)
        close(eng.W[r], want)
        assert float((want - start).abs().max()) > 100 * lr * 1e-3  # 6 steps moved the weights
    # the rates act per replica: the two rows are not one trajectory
    assert float((eng.W[0] - eng.W[1]).abs().max()) > 1e-4
    # the first step only sets v_0: after one step the weights are the initial ones
    one = rate_column(tiny_cfg(spec, over=[f"optim.lr={lr}"]), [lr, lr / 2], n=16)
    assert torch.equal(one.W[0], start.to(one.W.dtype)) and torch.equal(one.W[1], start.to(one.W.dtype))


def test_unclipped_adopt_on_a_quadratic_per_replica_rates():
    """clip=false (the paper's first version) on 0.5 ||A w - b||^2 per replica, lr an (R, 1) column:
    the unclipped update divides by v_{t-1} of an initial gradient that can be near 0 and blows up
    on the net's dead units (the authors' reason for the clip), so it is checked on a smooth loss."""
    from backproplab.methods.optimizers import adopt_update
    gen = torch.Generator().manual_seed(3)
    A, b = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, generator=gen)
    w0 = torch.randn(2, 7, generator=gen)
    lrs = torch.tensor([[0.01], [0.003]])
    grad = lambda w: torch.einsum("rij,ri->rj", A, torch.einsum("rij,rj->ri", A, w) - b)  # noqa: E731
    w, st = w0.clone(), {}
    for _ in range(6):
        adopt_update(w, grad(w), st, lrs, beta2=0.9, clip=False, weight_decay=0.5)
    for r in range(2):
        p, hand = {"w": w0[r].clone()}, {}
        for _ in range(6):
            p = adopt_by_hand(p, {"w": grad(p["w"][None].expand(2, -1))[r]}, hand, float(lrs[r]), b2=0.9,
                              clip=False, wd=0.5)
        close(w[r], p["w"], rtol=1e-6, atol=1e-7)
    assert float((w - w0).abs().min()) > 1e-3 and st["step"] == 6


def sig_adopt(tiny):
    """Through train() (the command's path): 3 steps of 16 digits at 2e-3 are the paper's 3 steps."""
    x, y = xy(tiny, 48)
    lr, p, st = F32(2e-3), init(), {}
    for t in range(3):
        p = {n: v.requires_grad_() for n, v in adopt_by_hand(p, grads(p, x[16 * t:16 * t + 16],
                                                                     y[16 * t:16 * t + 16]), st, lr).items()}
    assert_weights(public_run(tiny, "adopt", n=48, over=[f"optim.lr={lr}"]).params[0], p)
    assert_telling(p, sgd_steps(init(), x, y, [lr] * 3, 16)[-1])


ORACLES_ADOPT = {"adopt": lambda name: test_adopt_equals_the_papers_update_two_replicas_two_rates(
    "adopt:weight_decay=0.1", {"wd": 0.1})}
SIGNATURES_ADOPT = {"adopt": sig_adopt}


def test_adopt_through_train_matches_the_paper(tiny):
    sig_adopt(tiny)


@pytest.fixture(scope="module")
def tiny():
    from backproplab.data import load_dataset
    return load_dataset("mnist10k", 64, 32)


def test_adopt_resumes_bit_identical(tiny, tmp_path):
    """Two replicas, decay on, 3 passes of 4 steps: stop after pass 1 (ADOPT's t, m and v in the
    checkpoint), resume, and every weight hash and evaluation is the uninterrupted run's."""
    cfg = tiny_cfg("adopt:weight_decay=0.1", over=["train.passes=3", "train.seeds=2", "optim.lr=0.002"])
    full = train(cfg, data=tiny)
    assert full.final[0]["weights_sha256"] != full.final[1]["weights_sha256"]
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, data=tiny, progress=stop_in(1))
    ck = load_checkpoint(checkpoint_path(cfg, tmp_path))
    assert ck["passes_done"] == 1
    resumed = train(cfg, out=tmp_path, resume=True, data=tiny)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]
    assert [h["test"] for h in resumed.history] == [h["test"] for h in full.history]


@pytest.mark.parametrize("words,says", [
    (["+method=adopt:beta2=1.5"], "beta2"),
    (["+method=adopt:clip=maybe"], "clip"),
    (["+method=adopt:gamma=0.1"], "gamma"),
    (["+method=adopt:weight_decay=0.1", "+method=wd"], "wd"),
    (["+method=adopt", "+method=lion"], "lion"),
])
def test_adopt_bad_options_are_one_line_errors(words, says, tmp_path, capsys):
    code = main(["train", "modern_smoke", *words, "--json", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "adopt" in lines[0] and says in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing was trained or written


def test_adopt_card():
    m = get_method("adopt")
    assert m.fast and m.slot == "optimizer" and m.options["beta2"].default == 0.9999
    assert m.options["eps"].default == 1e-6 and m.options["clip"].default is True
    assert "Taniguchi" in m.paper and "2024" in m.paper
    # its family comes after every other one: the ranks (random-stream keys) of the rest did not move
    assert m.rank > get_method("lowrank").rank  # lowrank: the last method of the last family before it
