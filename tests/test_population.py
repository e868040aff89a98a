"""The one population engine: its three gradient paths agree, populations equal solo runs,
the automatic choice of path, and what a run records about it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset, pass_randomness
from backproplab.data.augment import shift_images
from backproplab.engine.kernelgrad import KernelGrad, kernel_reason
from backproplab.engine.population import Population, fused_reason, run_specs
from backproplab.engine.train import train
from backproplab.errors import UserError
from backproplab.methods.registry import get_method, list_methods
from backproplab.models.net1989 import Net1989

from test_methods import LR, TORCH_OPTIM, with_requirements

D = load_dataset("mnist10k", 96, 32)
HAVE_KERNELS = kernel_reason(preset("modern")) is None
FAST_PATHS = ["fused"] + (["kernel"] if HAVE_KERNELS else [])
BASE = ["data.n_train=96", "data.n_test=32", "train.passes=2", "train.batch=16"]
# modern_smoke keeps its dropout masks and shifts (both paths must see the same ones), SGD
METHOD_BASE = BASE + ["optim.name=sgd", "optim.lr=0.05", "optim.lr_end=none"]
# adaptive optimizers at rates where 6 steps stay smooth (as their torch.optim oracles run them): at
# SGD's 0.05 Adam's steps are chaotic and float rounding grows to the size of a step
RATE = {**LR, **{n: lr for n, (lr, _) in TORCH_OPTIM.items()}, "adam_sgd": 0.003}  # LR has lion, muon, schedule_free


def cfg_with(*methods, over=()):
    names = [m.split(":")[0] for m in methods]
    items = METHOD_BASE + [f"optim.lr={RATE[n]}" for n in names if n in RATE]
    items += [f"+method={m}" for m in with_requirements(methods)] + list(over)
    if "shift" in names:
        items.append("train.shift=0")
    if "dropout" in names:  # the method and model.dropout are two ways to the same masks
        items.append("model.dropout=0")
    return apply_overrides(preset("modern_smoke"), items)


def one_pass(cfg, seeds, path):
    eng = Population(cfg, seeds, path=path)
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    rand = [pass_randomness(s, 0, len(x), cfg.train.shift, cfg.model.dropout, eng.dropout_units) for s in seeds]
    sh = np.stack([r[0] for r in rand]) if cfg.train.shift else None
    kp = np.stack([r[1] for r in rand]) if cfg.model.dropout else None
    eng.train_pass(x, y, None, sh, kp)
    eng.end_pass()
    return eng


def test_kernel_gradients_equal_autograd():
    """The numba kernels' minibatch gradient against autograd of Net1989's modules, with
    dropout masks and shifts, shared inputs (kernel-side shifts) and per-replica inputs."""
    if not HAVE_KERNELS:
        pytest.skip("neither AVX2 + FMA nor AVX-512: the kernel path is not available on this CPU")
    R = 13          # shared inputs: one population-kernel block of 13 lanes; per replica: the solo kernel
    models = [Net1989(s, act="relu", out_act="none", dropout=0.25) for s in range(R)]
    W = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models])
    rng = np.random.default_rng(1)
    for B in (5, 24):
        x, y = D.train_x[:B].reshape(B, 16, 16), D.train_labels[:B].long()
        sh = rng.integers(-1, 2, (R, B, 2)).astype(np.int8)
        keep = rng.random((R, B, 192)) >= 0.25
        shifted = torch.stack([shift_images(x.reshape(B, 1, 16, 16), sh[r]).reshape(B, 16, 16) for r in range(R)])
        for per_replica in (False, True):
            kg = KernelGrad(R, "relu", "none", "ce", 0.25, per_replica_inputs=per_replica)
            G = kg.grad(W, shifted if per_replica else x, y, None if per_replica else sh, keep)
            for r, m in enumerate(models):
                loss = F.cross_entropy(m(shifted[r].reshape(B, 1, 16, 16), torch.from_numpy(keep[r])), y)
                g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(m.parameters()))])
                assert float((G[r] - g).norm() / g.norm()) < 1e-5, (B, per_replica, r)
                # the same gradient, bit for bit, as a population of one (the solo kernel)
                solo = KernelGrad(1, "relu", "none", "ce", 0.25, per_replica_inputs=per_replica).grad(
                    W[r:r + 1], shifted[r:r + 1] if per_replica else x, y,
                    None if per_replica else sh[r:r + 1], keep[r:r + 1])
                assert torch.equal(G[r], solo[0]), (B, per_replica, r)


@pytest.mark.parametrize("act,out_act,loss", [("relu", "none", "ce"), ("scaled_tanh", "scaled_tanh", "mse")])
def test_kernel_curvature_equals_gn_diag(act, out_act, loss):
    """grad(curvature=True): the solo kernel's sum of sdlm's per-example Gauss-Newton estimates
    over a batch, / B, is net1989_gn_diag's over the batch, / B (relative error < 1e-5 per
    parameter), without and with model.dropout keep masks and shifts; the gradient beside it is
    the plain accumulate's, bit for bit. The population kernel has no curvature mode."""
    if not HAVE_KERNELS:
        pytest.skip("neither AVX2 + FMA nor AVX-512: the kernel path is not available on this CPU")
    from backproplab.methods.sdlm import net1989_gn_diag
    R, B, p = 3, 24, 0.25
    models = [Net1989(s, act=act, out_act=out_act, dropout=p) for s in range(R)]
    W = torch.stack([torch.cat([q.detach().reshape(-1) for q in m.parameters()]) for m in models])
    x, y = D.train_x[:B].reshape(B, 16, 16), D.train_labels[:B].long()
    rng = np.random.default_rng(2)
    sh = rng.integers(-1, 2, (R, B, 2)).astype(np.int8)
    kg = KernelGrad(R, act, out_act, loss, p, per_replica_inputs=True)
    for shifts, keep in ((None, None), (sh, rng.random((R, B, 192)) >= p)):
        xs = torch.stack([x if shifts is None else shift_images(x.reshape(B, 1, 16, 16), shifts[r]).reshape(B, 16, 16)
                          for r in range(R)])
        G, H = kg.grad(W, xs, y, None, keep, curvature=True)
        assert H.shape == (R, W.shape[1]) and torch.equal(G, kg.grad(W, xs, y, None, keep))
        for r, m in enumerate(models):
            params = {n: q.detach() for n, q in m.named_parameters()}
            ref = net1989_gn_diag(params, xs[r].reshape(B, 1, 16, 16), act, out_act, loss,
                                  None if keep is None else torch.from_numpy(keep[r]), p)
            a = 0
            for n, q in params.items():
                got, want = H[r, a:a + q.numel()], ref[n].reshape(-1) / B
                a += q.numel()
                assert want.max() > 0 and float((got - want).norm() / want.norm()) < 1e-5, (keep is None, r, n)
    shared = KernelGrad(R, act, out_act, loss, p)
    shared.groups = [("pop", list(range(R)))]               # shared inputs, one population-kernel block
    with pytest.raises(ValueError, match="solo kernel"):
        shared.grad(W, x, y, curvature=True)


def test_sdlm_takes_the_kernel_curvature():
    """sdlm on the kernel path steps with the kernels' curvature (ctx.curvature), and a pass with
    it gives the weights of a pass with net1989_gn_diag (the other paths' estimate); a method that
    moves the weights between the gradient and the step (decoupled decay) keeps the torch estimate."""
    if not HAVE_KERNELS:
        pytest.skip("neither AVX2 + FMA nor AVX-512: the kernel path is not available on this CPU")
    cfg = cfg_with("sdlm")
    assert cfg.train.shift and cfg.model.dropout        # both paths see the same masks and shifts
    eng = one_pass(cfg, [0, 1], "kernel")
    assert eng.curvature and eng.ctx.curvature is not None and eng.ctx.curvature.shape == eng.W.shape
    ref = Population(cfg, [0, 1], path="kernel")
    ref.curvature = False                               # SDLM.step's own net1989_gn_diag
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    rand = [pass_randomness(s, 0, len(x), cfg.train.shift, cfg.model.dropout, ref.dropout_units) for s in (0, 1)]
    ref.train_pass(x, y, None, np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand]))
    ref.end_pass()
    assert ref.ctx.curvature is None
    torch.testing.assert_close(eng.W, ref.W, rtol=1e-4, atol=1e-5)
    assert not Population(cfg_with("sdlm", "wd"), [0], path="kernel").curvature


@pytest.mark.parametrize("act,out_act,loss", [("relu", "none", "ce"), ("tanh", "tanh", "mse")])
def test_kernel_soft_term_equals_autograd(act, out_act, loss):
    """The solo kernel's distillation term (lwf's): with targets p from other nets, the gradient of
    the batch loss + lam T^2 KL(p || softmax(out[u] / T)) over units u, against autograd, on all
    ten units and on 0-4; the population kernel refuses the term."""
    if not HAVE_KERNELS:
        pytest.skip("neither AVX2 + FMA nor AVX-512: the kernel path is not available on this CPU")
    from backproplab.engine.population import batch_loss
    from backproplab.methods.distill import soft_kl
    R, B, lam, T = 3, 24, 2.0, 3.0
    models = [Net1989(s, act=act, out_act=out_act, dropout=0.25) for s in range(R)]
    teachers = [Net1989(10 + s, act=act, out_act=out_act) for s in range(R)]
    W = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models])
    rng = np.random.default_rng(2)
    x, y = D.train_x[:B].reshape(B, 16, 16), D.train_labels[:B].long()
    sh = rng.integers(-1, 2, (R, B, 2)).astype(np.int8)
    keep = rng.random((R, B, 192)) >= 0.25
    shifted = torch.stack([shift_images(x.reshape(B, 1, 16, 16), sh[r]).reshape(B, 16, 16) for r in range(R)])
    kg = KernelGrad(R, act, out_act, loss, 0.25, per_replica_inputs=True)
    plain = kg.grad(W, shifted, y, None, keep)
    for units in (list(range(10)), [0, 1, 2, 3, 4]):
        mask = np.zeros(10, np.float32)
        mask[units] = 1.0
        p = np.zeros((R, B, 10), np.float32)
        with torch.no_grad():
            for r, t in enumerate(teachers):
                p[r][:, units] = F.softmax(t.eval()(shifted[r].reshape(B, 1, 16, 16))[:, units] / T, -1).numpy()
        G = kg.grad(W, shifted, y, None, keep, soft=(p, mask, lam, T))
        for r, m in enumerate(models):
            out = m(shifted[r].reshape(B, 1, 16, 16), torch.from_numpy(keep[r]))
            value = batch_loss(out, y, loss) + lam * soft_kl(out[:, units], torch.from_numpy(p[r][:, units]), T)
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(value, list(m.parameters()))])
            assert float((G[r] - g).norm() / g.norm()) < 1e-5, (units, r)
            assert float((G[r] - plain[r]).norm() / g.norm()) > 1e-2   # the term is not negligible here
    with pytest.raises(ValueError, match="solo kernel only"):
        KernelGrad(13, act, out_act, loss, 0.25).grad(W[[0] * 13], x, y, soft=(p[[0] * 13], mask, lam, T))


# every method that declares the fast paths, on each fast path that can run it
FAST = [(m.name, p) for m in list_methods() if m.fast for p in FAST_PATHS
        if fused_reason(cfg_with(m.name), run_specs(cfg_with(m.name)), p) is None]


def test_every_fast_method_has_a_fast_path():
    assert {n for n, _ in FAST} == {m.name for m in list_methods() if m.fast}


@pytest.mark.parametrize("name,path", FAST)
def test_fast_path_equals_autograd_for_every_fast_method(name, path):
    """For every method that allows the fast paths: the first step's gradient equals autograd's
    (relative error < 1e-5) and one pass's weights agree to float tolerance."""
    cfg = cfg_with(name)
    grads = {}
    for p in (path, "autograd"):
        eng = Population(cfg, [0, 1], path=p)
        seen, inner = [], eng._closure
        eng._closure = lambda second=False, inner=inner, seen=seen: seen.append(inner(second)) or seen[-1]
        x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
        rand = [pass_randomness(s, 0, len(x), cfg.train.shift, cfg.model.dropout, 192) for s in (0, 1)]
        eng.train_pass(x, y, None, np.stack([r[0] for r in rand]) if cfg.train.shift else None,
                       np.stack([r[1] for r in rand]) if cfg.model.dropout else None)
        eng.end_pass()
        grads[p] = (seen[0], eng.W.clone(), torch.stack(seen))
    (g_fast, w_fast, _), (g_ref, w_ref, g_all) = grads[path], grads["autograd"]
    assert float((g_fast - g_ref).norm() / g_ref.norm()) < 1e-5
    live = torch.ones_like(w_ref, dtype=torch.bool)
    atol = 1e-5
    if name in ADAPTIVE:
        # A per-weight normalizing optimizer magnifies a gradient's rounding where the gradient is
        # small, and over a pass rounding can flip a ReLU near 0 (the kernels and the stacked
        # forward's grouped convolutions round differently; seen: one h1_b entry of 19,520 whose
        # 6th-step gradient differed by one example's share): the weights agree to a fifth of a
        # step (0.2 lr).
        atol = 0.2 * cfg.optim.lr
    if name == "qat":
        # Fake quantization rounds each weight to its channel's grid: a float difference between the
        # paths that moves one weight across a rounding boundary changes its forward value by a whole
        # step (max|w| / 127.5), and that spreads over the pass (seen: 0.0053 after 6 steps at lr 0.05).
        # The first gradient above is still checked to 1e-5; the weights agree to a fifth of a step.
        atol = 0.2 * cfg.optim.lr
    if path == "fused" and name in ADAPTIVE:
        # The fused products move H1/H2's -1 padding into a subtracted sum of weights, so a gradient
        # that is exactly 0 (a dead unit) comes out as ~1e-9, and a per-weight normalizing optimizer
        # turns that into a step of order lr. Those weights (an exactly 0 gradient at some step of the
        # pass) are left out.
        live = (g_all != 0).all(0)
        assert live.float().mean() > 0.3
    torch.testing.assert_close(w_fast[live], w_ref[live], rtol=1e-4, atol=atol)


@pytest.mark.parametrize("classes", ["all", "0-4"])
def test_lwf_on_the_kernels_equals_autograd_away_from_its_start(classes):
    """The parametrized test above starts lwf at its frozen copy (step 1's term is 0). Here each
    replica's frozen copy is another net (the weights of seeds 7 and 8, loaded as a resumed run
    loads them): the first step's gradient on the kernel path equals autograd's (relative error
    < 1e-5) and differs from the cross-entropy's alone, and one pass's weights agree."""
    if not HAVE_KERNELS:
        pytest.skip("neither AVX2 + FMA nor AVX-512: the kernel path is not available on this CPU")
    old = Population(cfg_with("lwf"), [7, 8], path="autograd").W.clone()
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    got = {}
    for lam, path in ((2.0, "kernel"), (2.0, "autograd"), (0.0, "kernel")):
        cfg = cfg_with(f"lwf:lam={lam},T=3,classes={classes}")
        eng = Population(cfg, [0, 1], path=path)
        assert eng.path == path
        dict(eng.switches)["lwf"].load_state({"old": old.numpy()})
        seen, inner = [], eng._closure
        eng._closure = lambda second=False, inner=inner, seen=seen: seen.append(inner(second)) or seen[-1]
        rand = [pass_randomness(s, 0, len(x), cfg.train.shift, cfg.model.dropout, 192) for s in (0, 1)]
        eng.train_pass(x, y, None, np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand]))
        eng.end_pass()
        assert torch.equal(dict(eng.switches)["lwf"].old, old)   # not replaced by the run's start
        got[lam, path] = seen[0], eng.W.clone()
    (g_fast, w_fast), (g_ref, w_ref), (g_ce, _) = got[2.0, "kernel"], got[2.0, "autograd"], got[0.0, "kernel"]
    assert float((g_fast - g_ref).norm() / g_ref.norm()) < 1e-5
    assert float((g_ce - g_ref).norm() / g_ref.norm()) > 0.05
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-4, atol=1e-5)


ADAPTIVE = ("adagrad", "rmsprop", "adam", "adamw", "adam_sgd", "adadelta", "lion", "muon", "schedule_free",
            "adopt")


@pytest.mark.parametrize("path", FAST_PATHS + ["autograd"])
def test_replica_k_of_a_population_equals_a_solo_run_of_seed_k(path):
    cfg = cfg_with("ema", over=["train.seed=0"])
    pop = one_pass(cfg, [0, 1, 2], path)
    solo = one_pass(cfg, [2], path)
    if path in ("fused", "autograd"):
        # batched matrix products, and on the autograd path the stacked forward's grouped convolutions
        # (the replicas are the groups): the same maths, the rounding differs by replica count
        torch.testing.assert_close(pop.W[2], solo.W[0], rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(pop.W[2], solo.W[0])
    assert not torch.equal(pop.W[1], pop.W[2])  # seeds differ


def test_fast_paths_evaluate_the_model_their_methods_change():
    """The model changes the fast paths compute (nf's standardized weights, the dropout method's
    masks, nonorm) are also what they evaluate: the outputs equal the autograd path's ModNet."""
    x = D.test_x[:64].reshape(-1, 1, 16, 16)
    ref = {}
    for name in ("nf", "dropout", "nonorm"):
        cfg = cfg_with(name)
        ref[name] = Population(cfg, [0, 1], path="autograd").outputs(x)
        paths = [p for p in FAST_PATHS if fused_reason(cfg, run_specs(cfg), p) is None]
        assert paths and Population(cfg, [0]).path == paths[-1]   # chosen automatically
        for path in paths:
            torch.testing.assert_close(Population(cfg, [0, 1], path=path).outputs(x), ref[name], rtol=1e-5, atol=1e-5)
    # no dropout at evaluation; the standardized net is another function of the same weights
    torch.testing.assert_close(ref["dropout"], ref["nonorm"], rtol=1e-5, atol=1e-5)
    assert (ref["nf"] - ref["nonorm"]).abs().max() > 0.1
    with pytest.raises(UserError, match="the fused path does not compute the model change of nf"):
        Population(cfg_with("nf"), [0], path="fused")


@pytest.mark.parametrize("combo", [("sam", "dropout"), ("sam", "nf"), ("ema", "nf", "dropout"), ("lwf", "nf"),
                                   ("spatial_dropout", "dropout", "dropconnect", "shift"), ("sam", "dropconnect"),
                                   ("nf", "spatial_dropout"), ("lwf", "dropconnect")])
def test_fast_model_changes_compose_on_the_kernel_path(combo):
    """SAM's second gradient sees the same dropout masks (drawn once a step), the three noise
    methods draw from each replica's stream in ModNet's order (spatial, dropout, DropConnect),
    and averages, the evaluation and lwf's frozen net see the standardized weights: two passes
    on the kernels equal the autograd path."""
    if not HAVE_KERNELS:
        pytest.skip("neither AVX2 + FMA nor AVX-512: the kernel path does not run here")
    cfg = cfg_with(*combo)
    x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
    got = {}
    for path in ("kernel", "autograd"):
        eng = Population(cfg, [0, 1], path=path)
        for p in range(2):
            rand = [pass_randomness(s, p, len(x), cfg.train.shift, cfg.model.dropout, 192) for s in (0, 1)]
            eng.train_pass(x, y, None, np.stack([r[0] for r in rand]) if cfg.train.shift else None,
                           np.stack([r[1] for r in rand]) if cfg.model.dropout else None)
            eng.end_pass()
        got[path] = eng.W.clone(), eng.outputs(D.test_x[:32].reshape(-1, 1, 16, 16))
    torch.testing.assert_close(got["kernel"][0], got["autograd"][0], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got["kernel"][1], got["autograd"][1], rtol=1e-4, atol=1e-4)


def test_automatic_path_and_the_run_record():
    base = apply_overrides(preset("modern_smoke"), BASE)  # AdamW, linear decay, dropout, shifts
    assert Population(base, [0]).path == ("kernel" if HAVE_KERNELS else "fused")
    smooth = cfg_with("label_smoothing")
    assert Population(smooth, [0]).path == ("kernel" if HAVE_KERNELS else "fused")  # the kernels smooth too
    assert Population(cfg_with("batchnorm"), [0]).path == "autograd"
    assert Population(cfg_with("bf16"), [0]).path == "autograd"
    # lwf's term: the kernels add it, the fused products do not; with a model the kernels lack, autograd
    assert Population(cfg_with("lwf"), [0]).path == ("kernel" if HAVE_KERNELS else "autograd")
    assert Population(cfg_with("lwf", "batchnorm"), [0]).path == "autograd"
    with pytest.raises(UserError, match="the fused path does not compute lwf"):
        Population(cfg_with("lwf"), [0], path="fused")
    assert "allows the fast path (numba kernels)" in get_method("lwf").card()
    assert Population(cfg_with("l2"), [0]).path == Population(cfg_with("wd"), [0]).path  # a fast method
    tanh = apply_overrides(preset("modern_smoke"), BASE + ["model.act=tanh"])
    assert Population(tanh, [0]).path == ("kernel" if HAVE_KERNELS else "autograd")
    r = train(cfg_with("batchnorm"), data=D)
    assert r.summary()["path"] == "autograd"
    with pytest.raises(UserError, match="batchnorm need autograd or change the model"):
        Population(cfg_with("batchnorm"), [0], path="fused")


def test_per_replica_learning_rates():
    """A population over learning rates: row k trains as a solo run at rate k."""
    cfg = cfg_with("cosine", over=["optim.lr=0.003"])
    for path in FAST_PATHS + ["autograd"]:
        eng = Population(cfg, [0, 0], lrs=[0.003, 0.001], path=path)
        x, y = D.train_x.reshape(-1, 16, 16).numpy(), D.train_labels.numpy()
        rand = pass_randomness(0, 0, len(x), cfg.train.shift, cfg.model.dropout, 192)
        eng.train_pass(x, y, None, np.stack([rand[0]] * 2), np.stack([rand[1]] * 2))
        eng.end_pass()
        lo = apply_overrides(cfg_with("cosine", over=["optim.lr=0.001"]), [])
        ref = one_pass(lo, [0], path)
        torch.testing.assert_close(eng.W[1], ref.W[0], rtol=1e-5, atol=1e-6)
        assert not torch.equal(eng.W[0], eng.W[1])
