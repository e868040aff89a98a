"""Every registered method against an oracle: torch.optim / torch's schedulers and modules where
they exist, the paper's formula written out otherwise. Here the training side (optimizers,
gradients, schedules, averages, loss terms); test_methods_oracle_model.py has the model,
data and precision methods; together they must cover the registry."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.engine.eager import EagerPopulation
from backproplab.engine.population import Population
from backproplab.methods import schedules as S
from backproplab.methods.gradients import agc_
from backproplab.methods.registry import list_methods, parse_method
from backproplab.methods.regularizers import smooth_cross_entropy
from backproplab.models.modnet import ModNet
from backproplab.models.net1989 import PARAM_NAMES, init_params

from test_methods import (D96, F32, TORCH_OPTIM, X, Y, check_agc_through_the_engine, close, flat, lion_by_hand,
                          muon_adamw, muon_by_hand, net, orthogonalize_by_hand, run_engine, schedule_free_by_hand,
                          tiny_cfg, torch_run)
from test_methods_oracle_model import ORACLES_MODEL
from test_distill import ORACLES_DISTILL
from test_pruning import ORACLES_PRUNING
from test_adopt import ORACLES_ADOPT
from test_qat import ORACLES_QAT

# -- optimizers: the same trajectory as torch.optim over 6 steps -------------------------------
TORCH_OPT = {"sgd": (0.05, lambda p, lr: torch.optim.SGD(p, lr)), **TORCH_OPTIM}  # test_methods: one rate table


def oracle_torch_optim(name):
    lr, make = TORCH_OPT[name]
    eng = run_engine(tiny_cfg(name, over=[f"optim.lr={lr}"]))
    m = net()
    close(eng.W[0], torch_run(m, make(m.parameters(), lr)))


def oracle_adam_sgd(name):
    eng = run_engine(tiny_cfg("adam_sgd:at=0.5,sgd_lr=0.05", over=["optim.lr=0.003", "train.passes=1"]))
    m = net()

    def switch(i, opt):  # T = 6 steps, switch at step 3: a fresh SGD with momentum from the same weights
        return torch.optim.SGD(m.parameters(), 0.05, momentum=0.9) if i == 3 else opt
    close(eng.W[0], torch_run(m, torch.optim.Adam(m.parameters(), 0.003), per_step=switch))


def oracle_sdlm(name):
    eng = run_engine(tiny_cfg("sdlm", over=["train.batch=1"]), n=6)
    ref = EagerPopulation([{k: v.numpy() for k, v in init_params(0).items()}], act="relu", out_act="none",
                          loss="ce", optim="sdlm")
    ref.train_pass(X[:6].reshape(-1, 16, 16).numpy(), Y[:6].numpy(), np.full(6, 5e-4, np.float32))
    got = eng.params()[0]
    for k in PARAM_NAMES:
        close(got[k], ref.params()[0][k])


def oracle_sam(name):
    cfg = tiny_cfg("sam:rho=0.05", "batchnorm")
    eng = run_engine(cfg, n=16)
    ref = ModNet(0, act="relu", out_act="none", norm="batch")
    pert = copy.deepcopy(ref)
    g = torch.autograd.grad(F.cross_entropy(ref(X[:16]), Y[:16]), list(ref.parameters()))
    gf = torch.cat([t.reshape(-1) for t in g])
    with torch.no_grad():
        for p, t in zip(pert.parameters(), g):
            p.add_(t * (0.05 / gf.norm()))
    g2 = torch.autograd.grad(F.cross_entropy(pert(X[:16]), Y[:16]), list(pert.parameters()))
    expect = flat(ref) - cfg.optim.lr * torch.cat([t.reshape(-1) for t in g2])
    close(eng.W[0], expect)
    for n, b in ref.named_buffers():  # statistics of the first pass only
        if n.endswith(("_rm", "_rv")):
            close(getattr(eng.models[0], n), b, rtol=1e-6, atol=1e-7)


def oracle_agc(name):
    gen = torch.Generator().manual_seed(0)
    w = {k: torch.randn(*v.shape, generator=gen) for k, v in init_params(0).items()}
    g = {k: torch.randn(*v.shape, generator=gen) * 0.05 for k, v in w.items()}
    got = {k: v.clone() for k, v in g.items()}
    agc_(w, got, 0.01, 1e-3, skip=("out_w", "out_b"))
    for k in w:
        exp = g[k].clone()
        if k not in ("out_w", "out_b"):
            units = [(i,) for i in range(len(w[k]))] if not k.endswith("_b") else list(np.ndindex(*w[k].shape))
            for u in units:
                wn, gn = max(float(w[k][u].norm()), 1e-3), float(g[k][u].norm())
                if gn > 0.01 * wn:
                    exp[u] = g[k][u] * (0.01 * wn / gn)
        close(got[k], exp, rtol=1e-5, atol=1e-8)
    assert any(not torch.equal(got[k], g[k]) for k in w) and torch.equal(got["out_w"], g["out_w"])
    check_agc_through_the_engine(D96)  # and as the engine applies it: one step of train() on 16 digits


# -- 2023-2024 optimizers: the papers' rules by hand (test_methods.py), 6 steps of 16 digits -----------
def rate_column(cfg, lrs):
    """One pass of 6 steps, replicas of seed 0 at the given rates (the engine's (R, 1) rate column)."""
    eng = Population(cfg, [0] * len(lrs), lrs=lrs)
    eng.train_pass(X[:96].reshape(-1, 16, 16).numpy(), Y[:96].numpy(), None)
    eng.end_pass()
    return eng


def hand_run(update, lr, n=96, batch=16):
    """Net1989 from seed 0; update(params, grads, lr) -> new weights of some parameters, in place."""
    m = net()
    p = dict(m.named_parameters())
    for a in range(0, n, batch):
        g = dict(zip(p, torch.autograd.grad(F.cross_entropy(m(X[a:a + batch]), Y[a:a + batch]), list(p.values()))))
        with torch.no_grad():
            for k, v in update(p, g, lr).items():
                p[k].copy_(v)
    return flat(m)


def oracle_lion(name):
    spec, lr = "lion:weight_decay=0.5", F32(3e-4)
    eng = rate_column(tiny_cfg(spec, over=[f"optim.lr={lr}"]), [lr, lr / 2])
    for r, rate in enumerate((lr, F32(lr / 2))):
        st = {}
        close(eng.W[r], hand_run(lambda p, g, lr: lion_by_hand(p, g, st, lr, wd=0.5), rate))


def oracle_muon(name):
    # Net1989's matrices are all wide (rows < cols): the tall branch, batched, on random matrices
    from backproplab.methods.optimizers import newton_schulz5
    for shape in ((3, 30, 12), (3, 12, 30)):
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        close(newton_schulz5(G), torch.stack([orthogonalize_by_hand(m) for m in G]))
    lr = F32(0.02)
    eng = rate_column(tiny_cfg("muon:weight_decay=0.1", over=[f"optim.lr={lr}"]), [lr, lr / 2])
    for r, rate in enumerate((lr, F32(lr / 2))):
        st, opt = {}, []

        def update(p, g, lr):
            if not opt:
                opt.append(muon_adamw(p, lr, wd=0.1))
            for k, v in p.items():
                v.grad = None if k.endswith("_w") and k != "out_w" else g[k]
            new = muon_by_hand(p, g, st, lr, wd=0.1)
            opt[0].step()
            return new
        close(eng.W[r], hand_run(update, rate))


def oracle_schedule_free(name):
    # warm-up over 3 of the 6 steps, a weight decay: the trained weights are y, the evaluated x
    lr = F32(0.003)
    eng = rate_column(tiny_cfg("schedule_free:weight_decay=0.1", "warmup:frac=0.5",
                               over=[f"optim.lr={lr}", "train.passes=1"]),
                      [lr, lr / 2])
    m = net()
    p0 = {k: v.detach().clone() for k, v in m.named_parameters()}

    def at(t, y):
        with torch.no_grad():
            for k, v in m.named_parameters():
                v.copy_(y[k])
        return dict(zip(p0, torch.autograd.grad(F.cross_entropy(m(X[16 * t:16 * t + 16]), Y[16 * t:16 * t + 16]),
                                                list(m.parameters()))))
    for r, rate in enumerate((lr, F32(lr / 2))):
        y, x = schedule_free_by_hand(p0, at, [rate * min(1.0, (t + 1) / 3) for t in range(6)], wd=0.1)
        close(eng.W[r], torch.cat([v.reshape(-1) for v in y.values()]))
        close(torch.cat([torch.as_tensor(v).reshape(-1) for v in eng.params()[r].values()]),
              torch.cat([v.reshape(-1) for v in x.values()]))


# -- schedules: torch's schedulers, and the lr the engine steps with ---------------------------
def _torch_lrs(name, T, lr0, o):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    L = torch.optim.lr_scheduler
    sched = {"constant": lambda: L.ConstantLR(opt, factor=1.0, total_iters=0),
             "step": lambda: L.StepLR(opt, round(o.get("every", 0) * T) or 1, o.get("gamma")),
             "exponential": lambda: L.ExponentialLR(opt, o.get("final", 1) ** (1 / T)),
             "cosine": lambda: L.CosineAnnealingLR(opt, T),
             "cyclical": lambda: L.CyclicLR(opt, 0.1 * lr0, lr0, round(0.125 * T), cycle_momentum=False),
             "sgdr": lambda: L.CosineAnnealingWarmRestarts(opt, round(T / 15), 2),
             "onecycle": lambda: L.OneCycleLR(opt, lr0, total_steps=T, pct_start=0.3, div_factor=25,
                                              final_div_factor=1e4, cycle_momentum=False),
             "warmup": lambda: L.LinearLR(opt, 1 / round(0.2 * T), total_iters=round(0.2 * T) - 1)}[name]()
    out = []
    for _ in range(T):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def oracle_schedule(name):
    spec = parse_method(name + (":frac=0.2" if name == "warmup" else ""))
    T, lr0 = 45, 0.1
    fn = {"warmup": lambda t, T, lr0, frac: lr0 * S.warmup_factor(t, T, frac)}.get(name) or \
        getattr(S, f"{name}_lr")
    close([fn(t, T, lr0, **spec.options) for t in range(T)], _torch_lrs(name, T, lr0, spec.options),
          rtol=1e-6, atol=1e-12)
    seen = []  # the engine: 3 passes of 2 steps, T = 6
    run_engine(tiny_cfg(spec.name + (":frac=0.5" if name == "warmup" else ""), over=["train.passes=3"]), n=32,
               passes=3,
               record=lambda c: seen.append((c.step, c.total_steps, c.lr)))
    opts = dict(parse_method(name + (":frac=0.5" if name == "warmup" else "")).options)
    assert [s[:2] for s in seen] == [(t, 6) for t in range(6)]
    close([s[2] for s in seen], [fn(t, 6, 0.05, **opts) for t in range(6)], rtol=1e-12, atol=0)


# -- averaging ---------------------------------------------------------------------------------
def oracle_swa(name):
    snaps = []
    eng = Population(tiny_cfg("swa:start=0.5", "batchnorm", over=["train.passes=3"]), [0])
    for _ in range(3):
        eng.train_pass(X[:32].reshape(-1, 16, 16).numpy(), Y[:32].numpy(), np.full(32, 0.05))
        eng.end_pass()
        snaps.append(eng.W[0].clone())
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(snaps[0].clone())
    avg = torch.optim.swa_utils.AveragedModel(holder)
    for s in snaps[1:]:  # passes 2 and 3 end after 0.5 * 3 passes
        holder.w.data.copy_(s)
        avg.update_parameters(holder)
    got = torch.cat([torch.as_tensor(v).reshape(-1) for v in eng.params()[0].values()])
    close(got, avg.module.w.detach())
    p = eng.params()[0]  # BatchNorm statistics recomputed for the average: H1's batch statistics
    a1 = F.conv2d(F.pad(X[:32], (2, 2, 2, 2), value=-1.0), torch.as_tensor(p["h1_w"]), stride=2) + \
        torch.as_tensor(p["h1_b"])
    close(eng.eval_buffers[0]["h1_rm"], a1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    close(eng.eval_buffers[0]["h1_rv"], a1.transpose(0, 1).reshape(12, -1).var(1), rtol=1e-4, atol=1e-6)


def oracle_ema(name):
    snaps = []
    eng = run_engine(tiny_cfg("ema:decay=0.9"), record=lambda c: snaps.append(c.w[0].clone()))
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(snaps[0].clone())
    avg = torch.optim.swa_utils.AveragedModel(holder, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    for s in snaps:
        holder.w.data.copy_(s)
        avg.update_parameters(holder)
    got = torch.cat([torch.as_tensor(v).reshape(-1) for v in eng.params()[0].values()])
    close(got, avg.module.w.detach())


# -- regularizers ------------------------------------------------------------------------------
def oracle_l1(name):
    eng = run_engine(tiny_cfg("l1:lam=0.01"), n=16)
    m = net()
    g = torch.autograd.grad(F.cross_entropy(m(X[:16]), Y[:16]), list(m.parameters()))
    expect = flat(m) - 0.05 * (torch.cat([t.reshape(-1) for t in g]) + 0.01 * torch.sign(flat(m)))
    close(eng.W[0], expect)


def oracle_l2(name):
    eng = run_engine(tiny_cfg("l2:lam=0.01"))
    m = net()
    close(eng.W[0], torch_run(m, torch.optim.SGD(m.parameters(), 0.05, weight_decay=0.01)))


def oracle_wd(name):
    eng = run_engine(tiny_cfg("adam", "wd:wd=0.01", over=["optim.lr=0.003"]))
    m = net()
    close(eng.W[0], torch_run(m, torch.optim.AdamW(m.parameters(), 0.003, weight_decay=0.01)))


def oracle_label_smoothing(name):
    logits, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    close(smooth_cross_entropy(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    eng = run_engine(tiny_cfg("label_smoothing"))
    m = net()
    ls = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)  # noqa: E731
    close(eng.W[0], torch_run(m, torch.optim.SGD(m.parameters(), 0.05), loss=ls))


ORACLES = {**{n: oracle_torch_optim for n in TORCH_OPT}, "adam_sgd": oracle_adam_sgd, "sdlm": oracle_sdlm,
           "sam": oracle_sam, "agc": oracle_agc,
           **{n: oracle_schedule for n in ("constant", "step", "exponential", "cosine", "cyclical", "sgdr",
                                           "onecycle", "warmup")},
           "swa": oracle_swa, "ema": oracle_ema, "l1": oracle_l1, "l2": oracle_l2, "wd": oracle_wd,
           "label_smoothing": oracle_label_smoothing,
           "lion": oracle_lion, "muon": oracle_muon, "schedule_free": oracle_schedule_free,
           **ORACLES_DISTILL, **ORACLES_PRUNING, **ORACLES_ADOPT, **ORACLES_QAT}


def test_every_method_has_an_oracle():
    assert not set(ORACLES) & set(ORACLES_MODEL)
    assert set(ORACLES) | set(ORACLES_MODEL) == {m.name for m in list_methods()}
    assert all(m.oracle for m in list_methods())


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_oracle(name):
    ORACLES[name](name)
