"""The stacked ModNet forward (models/stacked.py) against R separate ModNet modules: outputs,
gradients, BatchNorm buffers and per-replica noise for every option, R = 1 and R = 3; and the
engine's stacked autograd path against its loop over the modules (Population(..., _loop=True))."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset, pass_randomness
from backproplab.engine.population import Population
from backproplab.models.modnet import ModNet
from backproplab.models.stacked import StackedModNet

D = load_dataset("mnist10k", 96, 32)
X = D.train_x.reshape(-1, 1, 16, 16)
Y = D.train_labels.long()
B = 12
NOISE = dict(drop=0.3, dropconnect=0.3, spatial=0.3)
OPTIONS = {
    "plain": {}, "batch": dict(norm="batch"), "layer": dict(norm="layer"), "group": dict(norm="group"),
    "group3": dict(norm="group", groups=3), "blocks": dict(blocks=2), "rezero": dict(blocks=2, rezero=True),
    "ws": dict(ws=True, blocks=1), "drop": dict(drop=0.3), "dropconnect": dict(dropconnect=0.3),
    "spatial": dict(spatial=0.3), "drop_path": dict(blocks=2, drop_path=0.6), "keep": dict(dropout=0.25),
    "all": dict(norm="batch", blocks=2, drop_path=0.4, dropout=0.25, **NOISE),
    "all_group_rezero": dict(norm="group", blocks=1, rezero=True, drop_path=0.5, **NOISE),
}
ACTS = {"plain": ("relu", "none"), "all": ("tanh", "tanh"), "layer": ("scaled_tanh", "none")}


def modules(R, kw, act=("relu", "none")):
    """R ModNets (seeds 0..R-1) whose ReZero scalars, norm affines and biases are moved off their
    init (a zero alpha or unit gain would hide a mistake; and with ws, whose weights sum to 0 per
    unit, a zero bias leaves every pre-activation of a blank window at 0 plus rounding, on ReLU's
    kink, where two correct computations take opposite slopes)."""
    ms = []
    for s in range(R):
        m = ModNet(s, act=act[0], out_act=act[1], **kw)
        g = torch.Generator().manual_seed(50 + s)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(("_alpha", "_ng", "_nb", "_b")):
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        ms.append(m)
    return ms


def stacked_params(ms):
    return {n: torch.stack([getattr(m, n).detach() for m in ms]).requires_grad_() for n, _ in ms[0].named_parameters()}


def inputs(R):
    x = torch.stack([X[r * B:(r + 1) * B] for r in range(R)])                      # (R, B, 1, 16, 16)
    keep = torch.rand(R, B, 192, generator=torch.Generator().manual_seed(3)) >= 0.25
    return x, keep


def loss_of(out):  # (R, B, 10) -> sum over replicas of the mean cross-entropy
    return F.cross_entropy(out.float().reshape(-1, 10), Y[:B].repeat(len(out)), reduction="none").sum() / B


def rel(a, b, floor=1e-12):
    """Relative difference; floor: the norm below which b counts as 0 (a bias before BatchNorm gets
    a gradient of rounding noise)."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), floor))


def both(R, kw, act=("relu", "none"), training=True, noise=True):
    """(module outputs, module grads per name (R, ...)), (stacked outputs, stacked grads), modules, stack."""
    ms = modules(R, kw, act)
    st = StackedModNet(ms[0], R)
    P = stacked_params(ms)
    x, keep = inputs(R)
    keep = keep if kw.get("dropout") else None
    for r, m in enumerate(ms):
        m.train(training)
        m.gen = torch.Generator().manual_seed(100 + r) if noise else None
    ref = torch.stack([m(x[r], None if keep is None else keep[r]) for r, m in enumerate(ms)])
    gens = [torch.Generator().manual_seed(100 + r) for r in range(R)] if noise else None
    out = st(P, x, keep, gens, training=training)
    names = list(P)
    g_ref = torch.autograd.grad(loss_of(ref), [p for m in ms for p in m.parameters()])
    k = len(names)
    g_ref = {n: torch.stack([g_ref[r * k + i] for r in range(R)]) for i, n in enumerate(names)}
    g_st = dict(zip(names, torch.autograd.grad(loss_of(out), list(P.values()))))
    return (ref, g_ref), (out, g_st), ms, st


@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("opt", sorted(OPTIONS))
def test_stacked_equals_the_modules(opt, R):
    kw = OPTIONS[opt]
    (ref, g_ref), (out, g_st), ms, st = both(R, kw, ACTS.get(opt, ("relu", "none")))
    assert out.shape == (R, B, 10)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert rel(out, ref) < 1e-5
    for n, g in g_ref.items():
        assert rel(g_st[n], g, floor=1e-2) < 1e-4, n
        torch.testing.assert_close(g_st[n], g, rtol=1e-3, atol=1e-5, msg=n)
    for n, b in st.bufs.items():  # BatchNorm running averages, per replica and channel
        torch.testing.assert_close(b, torch.stack([getattr(m, n) for m in ms]), rtol=1e-5, atol=1e-6, msg=n)
        assert not torch.equal(b, torch.zeros_like(b) if n.endswith("_rm") else torch.ones_like(b)), n


def test_noise_is_drawn_per_replica():
    """Every kind of noise on: a replica's masks are its own generator's draws (replica 1 of 3
    fed generator seeds (5, 6, 7) equals a solo module fed 6), and other draws change the output."""
    kw = dict(blocks=2, drop_path=0.5, **NOISE)
    ms = modules(3, kw)
    st, P = StackedModNet(ms[0], 3), stacked_params(ms)
    x, _ = inputs(3)
    out = st(P, x, None, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    ms[1].gen = torch.Generator().manual_seed(6)
    torch.testing.assert_close(out[1], ms[1](x[1]), rtol=1e-4, atol=1e-5)
    other = st(P, x, None, [torch.Generator().manual_seed(s) for s in (5, 8, 7)])
    assert rel(other[1], out[1]) > 1e-2
    torch.testing.assert_close(other[0], out[0], rtol=0, atol=0)   # replica 0's stream unchanged
    quiet = st(P, x, None, None)   # no generators: no noise, as a module with gen None
    ms[1].gen = None
    torch.testing.assert_close(quiet[1], ms[1](x[1]), rtol=1e-4, atol=1e-5)


def test_batchnorm_modes():
    """update_stats=False (SAM's second pass) leaves the running averages alone; momentum is the
    update's; eval mode normalizes with the running averages and draws no noise."""
    ms = modules(3, dict(norm="batch", blocks=1, drop=0.5))
    st, P = StackedModNet(ms[0], 3), stacked_params(ms)
    x, _ = inputs(3)
    before = {n: b.clone() for n, b in st.bufs.items()}
    st(P, x, None, None, update_stats=False)
    assert all(torch.equal(before[n], b) for n, b in st.bufs.items())
    st(P, x, None, None, momentum=1.0)   # momentum 1: the running mean is this batch's mean
    for m in ms:
        m.bn_momentum = 1.0
    with torch.no_grad():
        for r, m in enumerate(ms):
            m(x[r])
    for n, b in st.bufs.items():
        torch.testing.assert_close(b, torch.stack([getattr(m, n) for m in ms]), rtol=1e-5, atol=1e-6)
    xs = X[40:40 + B]  # eval: shared inputs, running averages, no noise even with generators
    with torch.no_grad():
        ev = st(P, xs, None, [torch.Generator() for _ in range(3)], training=False)
        for r, m in enumerate(ms):
            m.eval()
            torch.testing.assert_close(ev[r], m(xs), rtol=1e-4, atol=1e-5)
    assert rel(ev[0], ev[1]) > 1e-2


def test_bf16_autocast_matches_the_modules():
    (ref, g_ref), (out, g_st), _, _ = (None, None), (None, None), None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ref, g_ref), (out, g_st), _, _ = both(3, dict(norm="batch", blocks=1))
    assert out.dtype == ref.dtype
    assert rel(out.float(), ref.float()) < 2e-2
    names = list(g_ref)
    assert rel(torch.cat([g_st[n].flatten() for n in names]), torch.cat([g_ref[n].flatten() for n in names])) < 5e-2


# -- the engine: stacked autograd path against the loop over the modules ------------------------
BASE = ["data.n_train=96", "data.n_test=32", "train.passes=2", "train.batch=16", "optim.name=sgd",
        "optim.lr=0.05", "optim.lr_end=none"]
ENGINE_CASES = {
    # tanh: with ReLU, a pre-activation on the kink (the blank border's ties) takes one slope or the
    # other by rounding, and after a few SAM steps on BatchNorm the two paths part (1e-6 to 6e-4
    # in one step, measured); the smooth activation compares what the case is for: BatchNorm's
    # buffers, SAM's second pass, SWA's recomputed statistics, the blocks and their drop masks
    "batchnorm_sam_swa": ["+method=batchnorm", "+method=sam", "+method=swa:start=0", "+method=resblocks",
                          "+method=stochastic_depth", "model.act=tanh"],
    "noise_l2_agc": ["+method=dropconnect", "+method=spatial_dropout", "+method=l2", "+method=agc"],
    "nf_rezero_bf16": ["+method=nf", "+method=resblocks", "+method=rezero", "+method=bf16"],
    "groupnorm_dropout": ["+method=groupnorm", "+method=dropout", "model.dropout=0"],
}


def run(cfg, seeds, loop, passes=2):
    eng = Population(cfg, seeds, path="autograd", _loop=loop)
    seen, inner = [], eng._closure
    eng._closure = lambda second=False: seen.append(inner(second)) or seen[-1]
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    for p in range(passes):
        rand = [pass_randomness(s, p, len(x), cfg.train.shift, cfg.model.dropout, eng.dropout_units) for s in seeds]
        eng.train_pass(x, y, None, np.stack([r[0] for r in rand]) if cfg.train.shift else None,
                       np.stack([r[1] for r in rand]) if cfg.model.dropout else None)
        eng.end_pass()
    return eng, seen


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_engine_stacked_equals_the_loop(case):
    cfg = apply_overrides(preset("modern_smoke"), BASE + ENGINE_CASES[case])
    (st, g_st), (lp, g_lp) = run(cfg, [0, 1, 2], False), run(cfg, [0, 1, 2], True)
    assert st.stack is not None and lp.stack is None
    bf16 = "bf16" in case
    assert len(g_st) == len(g_lp) and rel(g_st[0], g_lp[0]) < (2e-2 if bf16 else 1e-5)
    if bf16:
        assert rel(st.W, lp.W) < 1e-3
    else:
        torch.testing.assert_close(st.W, lp.W, rtol=1e-4, atol=1e-5)
    for r in range(3):  # BatchNorm buffers: the modules' own buffers are rows of the stack's
        for n, b in st._bn_buffers(r).items():
            assert b.data_ptr() == st.stack.bufs[n][r].data_ptr()
            torch.testing.assert_close(b, lp._bn_buffers(r)[n], rtol=1e-4, atol=1e-5)
    if st.eval_buffers:  # recomputed for the averaged weights
        for a, b in zip(st.eval_buffers, lp.eval_buffers):
            for n in a:
                torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5)
    o_st, o_lp = st.outputs(D.test_x), lp.outputs(D.test_x)
    if bf16:  # bfloat16 products: 8-bit mantissas, rounded where the kernels differ
        assert rel(o_st, o_lp) < 2e-2
    else:
        torch.testing.assert_close(o_st, o_lp, rtol=1e-4, atol=1e-5)


def test_engine_state_round_trip_and_resume_bits():
    """state()/load_state() restore the stacked buffers (the checkpoint keeps one entry per replica
    and buffer); a resumed population trains on to the same bits as the uninterrupted one."""
    cfg = apply_overrides(preset("modern_smoke"), BASE + ENGINE_CASES["batchnorm_sam_swa"] + ["train.passes=3"])
    full, _ = run(cfg, [0, 1], False, passes=3)
    half, _ = run(cfg, [0, 1], False, passes=2)
    st = half.state()
    assert "1.buf.h1_rm" in st and st["1.buf.h1_rm"].shape == (12,)
    fresh = Population(cfg, [0, 1], path="autograd")
    fresh.load_state(st)
    assert torch.equal(fresh.stack.bufs["h1_rm"][1], torch.as_tensor(st["1.buf.h1_rm"]))
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    rand = [pass_randomness(s, 2, len(x), cfg.train.shift, cfg.model.dropout, fresh.dropout_units) for s in (0, 1)]
    fresh.train_pass(x, y, None, np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand]))
    fresh.end_pass()
    assert torch.equal(fresh.W, full.W)
    for n, b in full.stack.bufs.items():
        assert torch.equal(fresh.stack.bufs[n], b)
