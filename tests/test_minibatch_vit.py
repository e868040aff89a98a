import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from backproplab.config import Config, apply_overrides, preset
from backproplab.data import pass_randomness
from backproplab.engine.checkpoint import load_checkpoint, save_checkpoint, to_numpy_state
from backproplab.engine.eager import EagerPopulation
from backproplab.engine.population import Population, batch_loss
from backproplab.engine.train import step_lrs, train
from backproplab.errors import UserError
from backproplab.models.net1989 import MACS, N_PARAMS, init_params
from backproplab.models.registry import build_model, dropout_units, list_models, model_card, model_macs
from backproplab.models.vit import ViT, count_params, vit_macs, vit_params


def cfg_for(model="net1989", **kw):
    c = Config()
    over = [f"model.name={model}", "train.engine=population"]
    if model == "vit":
        over += ["model.act=relu", "model.out_act=none", "train.loss=ce", "optim.name=adamw", "optim.lr=1e-3"]
    return apply_overrides(c, over + [f"{k}={v}" for k, v in kw.items()])


def digits_np(digits, n):
    return digits.train_x[:n].reshape(-1, 16, 16).numpy(), digits.train_labels[:n].numpy()


def max_diff(pa, pb):
    return max(float(np.abs(a[k] - b[k]).max()) for a, b in zip(pa, pb) for k in a)


# -- the micro-ViT ---------------------------------------------------------------------------
def test_default_vit_matches_1989_net_in_params_and_macs():
    m = Config().model
    vit = ViT(0, m.dim, m.depth, m.heads, m.patch)
    n, macs = count_params(vit), vit_macs(m.dim, m.depth, m.heads, m.patch)
    assert n == vit_params(m.dim, m.depth, m.patch)
    assert abs(n / N_PARAMS - 1) < 0.10, n
    assert abs(macs / MACS - 1) < 0.25, macs
    assert (N_PARAMS, MACS) == (9760, 63660)
    m.name = "vit"
    card = model_card(m)
    assert card["params"] == n and card["macs"] == macs and card["dropout_units"] == m.dim


@pytest.mark.parametrize("dim,depth,heads,patch", [(16, 3, 2, 8), (24, 2, 2, 4), (12, 1, 3, 6)])
def test_vit_macs_agree_with_flop_counter(dim, depth, heads, patch):
    # FlopCounterMode counts 2 FLOPs per multiply-add of mm/addmm/bmm; LayerNorm, softmax,
    # the activation, bias and position adds are not counted by either side.
    vit = ViT(0, dim, depth, heads, patch)
    with FlopCounterMode(display=False) as fc:
        vit(torch.zeros(1, 1, 16, 16))
    counted = fc.get_total_flops() / 2
    assert abs(counted / vit_macs(dim, depth, heads, patch) - 1) < 0.02


def test_registry_builds_every_model_deterministically():
    state = torch.get_rng_state()
    for name in list_models():
        m = Config().model
        m.name = name
        a, b, c = build_model(m, 3), build_model(m, 3), build_model(m, 4)
        assert a(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
        assert model_macs(m) > 0 and dropout_units(m) > 0
    assert torch.equal(state, torch.get_rng_state())  # init draws from its own generator
    with pytest.raises(UserError):
        ViT(0, dim=10, heads=3)


# -- the population engine on minibatches and other models ---------------------------------------
def _pass(engine, x, y, shifts=None, keep=None, bounds=None):
    bounds = [0, len(x)] if bounds is None else bounds
    for a, b in zip(bounds[:-1], bounds[1:]):
        engine.train_pass(x[a:b], y[a:b], None, None if shifts is None else shifts[:, a:b],
                          None if keep is None else keep[:, a:b])
    engine.end_pass()


@pytest.mark.parametrize("path", ["autograd", "kernel"])
@pytest.mark.parametrize("recipe", [dict(opt="sgd", loss="mse", act="tanh", out="tanh", lr=0.03),
                                    dict(opt="adamw", loss="ce", act="relu", out="none", lr=1e-3)])
def test_batch_of_one_equals_eager_engine(digits, recipe, path):
    x, y = digits_np(digits, 200)
    seeds, p = [0, 1], 0.25
    rand = [pass_randomness(s, 0, len(x), 1, p, 192) for s in seeds]
    shifts, keep = np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand])
    c = cfg_for(**{"optim.name": recipe["opt"], "train.loss": recipe["loss"], "model.act": recipe["act"],
                   "model.out_act": recipe["out"], "model.dropout": p, "optim.weight_decay": 0.01,
                   "optim.lr": recipe["lr"], "optim.lr_end": recipe["lr"] / 3, "train.passes": 1})
    ref = EagerPopulation([{n: v.numpy() for n, v in init_params(s).items()} for s in seeds], act=recipe["act"],
                          out_act=recipe["out"], loss=recipe["loss"], optim=recipe["opt"], weight_decay=0.01,
                          dropout=p)
    ref.train_pass(x, y, step_lrs(c, 0, len(x)), shifts, keep)  # the decay the engine derives from the config
    pop = Population(c, seeds, path=path)
    _pass(pop, x, y, shifts, keep)
    assert max_diff(ref.params(), pop.params()) < 1e-5


def test_adamw_equals_torch_adamw_on_a_plain_module(digits):
    x, y = digits_np(digits, 64)
    c = cfg_for("vit", **{"train.batch": 16, "optim.weight_decay": 0.05, "optim.beta1": 0.8, "optim.eps": 1e-6,
                          "optim.lr": 2e-3})
    pop = Population(c, [5])
    _pass(pop, x, y)
    m = build_model(c.model, 5)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.05)
    xt, yt = torch.from_numpy(x).reshape(-1, 1, 16, 16), torch.from_numpy(y)
    for a in range(0, 64, 16):
        opt.zero_grad()
        batch_loss(m(xt[a:a + 16]), yt[a:a + 16], "ce").backward()  # the engine's loss: same gradients
        opt.step()
    ref = [{n: p.detach().numpy() for n, p in m.named_parameters()}]
    assert list(ref[0]) == list(pop.params()[0])
    # same gradients; the engine steps with torch's fused AdamW kernel, which rounds a few ulp apart
    # from the reference's eight elementwise ops: a wrong term (a bias correction, the decay) would
    # be off by ~lr = 2e-3
    assert max_diff(ref, pop.params()) < 1e-5
    assert pop.state()["m.adamw.step"] == 4


@pytest.mark.parametrize("model", ["vit", "convnet"])
def test_vmap_path_equals_loop_path(digits, model):
    x, y = digits_np(digits, 96)
    over = {"train.batch": 32, "optim.name": "sgd", "optim.lr": 0.01}
    if model == "convnet":
        over.update({"model.act": "relu", "model.out_act": "none", "train.loss": "ce"})
    c = cfg_for(model, **over)
    a, b = Population(c, [0, 1, 2], vmap=False), Population(c, [0, 1, 2])
    assert b.vmapped and not a.vmapped
    for e in (a, b):
        _pass(e, x, y)
    assert max_diff(a.params(), b.params()) < 1e-5
    xt = digits.test_x[:50]
    assert torch.allclose(a.outputs(xt), b.outputs(xt), atol=1e-5)


@pytest.mark.parametrize("model", ["net1989", "vit"])
def test_batches_do_not_depend_on_chunking(digits, model):
    x, y = digits_np(digits, 150)
    c = cfg_for(model, **{"train.batch": 32, "model.dropout": 0.25, "train.shift": 1})
    units, seeds = dropout_units(c.model), [0, 1]
    rand = [pass_randomness(s, 0, 150, 1, 0.25, units) for s in seeds]
    shifts, keep = np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand])
    once, eight = Population(c, seeds), Population(c, seeds)
    _pass(once, x, y, shifts, keep, [0, 150])
    _pass(eight, x, y, shifts, keep, np.linspace(0, 150, 9).astype(int))
    assert max_diff(once.params(), eight.params()) == 0.0
    assert once.t == 5  # ceil(150 / 32): the pass's last batch is the smaller one


@pytest.mark.parametrize("model", ["net1989", "vit"])
def test_state_resume_is_bit_identical(digits, model, tmp_path):
    x, y = digits_np(digits, 150)
    c = cfg_for(model, **{"train.batch": 24, "model.dropout": 0.25, "train.shift": 1, "optim.name": "adamw",
                          "optim.lr": 1e-3, "train.passes": 2})
    units, seeds = dropout_units(c.model), [3, 4]
    rand = [[pass_randomness(s, p, 150, 1, 0.25, units) for s in seeds] for p in range(2)]
    sh = [np.stack([r[0] for r in rp]) for rp in rand]
    kp = [np.stack([r[1] for r in rp]) for rp in rand]
    full = Population(c, seeds)
    for p in range(2):
        _pass(full, x, y, sh[p], kp[p])
    first = Population(c, seeds)
    _pass(first, x, y, sh[0], kp[0])
    save_checkpoint(tmp_path / "s.pt", {"engine": first.state()})
    resumed = Population(c, seeds)
    resumed.load_state(to_numpy_state(load_checkpoint(tmp_path / "s.pt")["engine"]))
    _pass(resumed, x, y, sh[1], kp[1])
    sa, sb = full.state(), resumed.state()
    assert sorted(sa) == sorted(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_resume_through_train_is_bit_identical(tmp_path):
    cfg = apply_overrides(preset("smoke"), ["model.name=vit", "train.engine=population", "train.batch=16",
                                            "model.act=relu", "model.out_act=none", "train.loss=ce",
                                            "optim.name=adamw", "optim.lr=1e-3", "model.dropout=0.25",
                                            "train.shift=1", "data.n_train=120", "data.n_test=40",
                                            "train.passes=3", "train.seeds=2"])
    full = train(cfg)

    class Stop(Exception):
        pass

    def stop(pass_idx, done, total):
        if pass_idx == 1:
            raise Stop
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, progress=stop)
    resumed = train(cfg, out=tmp_path, resume=True)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]


def test_smoke_vit_learns(digits):
    cfg = apply_overrides(preset("smoke"), ["model.name=vit", "train.engine=population", "train.batch=32",
                                            "model.act=relu", "model.out_act=none", "train.loss=ce",
                                            "optim.name=adamw", "optim.lr=3e-3", "train.passes=2"])
    res = train(cfg)
    assert res.status == "finished" and len(res.history) == 2
    assert res.final[0]["test_error"] < 75.0  # chance is 90%


def test_refuses_what_it_cannot_do():
    with pytest.raises(UserError, match="sdlm: needs model.name=net1989, not vit"):
        cfg_for("vit", **{"optim.name": "sdlm"})
    e = Population(cfg_for(**{"model.dropout": 0.5}), [0])
    e.train_pass(np.zeros((4, 16, 16), np.float32), np.zeros(4, np.int64), None)
    with pytest.raises(ValueError, match="keep masks"):
        e.end_pass()
