"""Tests over the methods registry: every method trains, every pair composes or is refused by
name, every method resumes bit for bit, the CLI lists and trains. Tiny data: 64 training and
32 test digits, batch 16. Oracles for each method are in test_methods_oracle.py.
"""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.config import MethodSpec, apply_overrides, from_dict, preset, validate
from backproplab.data import load_dataset
from backproplab.engine.checkpoint import load_checkpoint
from backproplab.engine.population import HOOK_ATTR, Population
from backproplab.engine.train import checkpoint_path, train
from backproplab.errors import UserError
from backproplab.models.net1989 import Net1989
from backproplab.methods.registry import (HOOKS, build_switch, get_method, incompatibility, list_methods,
                                          parse_method, with_method)

from backproplab.cli import main

NAMES = [m.name for m in list_methods()]
BASE = ["data.n_train=64", "data.n_test=32", "train.passes=2", "train.batch=16", "model.dropout=0",
        "train.shift=0", "optim.lr_end=none", "optim.name=sgd", "optim.lr=0.05"]


LR = {"sdlm": 5e-4}  # the 1989 optimizer divides by mu + h: its lr is per unit curvature


def with_requirements(names):
    out = list(names)
    for n in (x.split(":")[0] for x in names):
        req = get_method(n).requires
        if req and not set(req) & set(out):
            out.append(req[0])
    return out


def tiny_cfg(*methods, over=()):
    lr = [f"optim.lr={LR[m]}" for m in methods if m in LR]
    items = BASE + lr + [f"+method={m}" for m in with_requirements(methods)] + list(over)
    return apply_overrides(preset("modern_smoke"), items)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("mnist10k", 64, 32)


# -- oracle helpers (test_methods_oracle*.py): 96 digits, one replica, constant lr ----------------
D96 = load_dataset("mnist10k", 96, 32)
X, Y = D96.train_x.reshape(-1, 1, 16, 16), D96.train_labels.long()


def run_engine(cfg, n=96, passes=1, record=None):
    """One replica, `passes` passes over the first n digits at constant lr; record(ctx) after each step."""
    eng = Population(cfg, [0])
    if record:
        opt = eng._hook("step")[0]
        inner = opt.step
        opt.step = lambda ctx: (inner(ctx), record(ctx))
    for _ in range(passes):
        eng.train_pass(X[:n].reshape(-1, 16, 16).numpy(), Y[:n].numpy(), np.full(n, cfg.optim.lr))
        eng.end_pass()
    return eng


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def torch_run(model, opt, n=96, batch=16, loss=F.cross_entropy, per_step=None):
    for i, a in enumerate(range(0, n, batch)):
        if per_step:
            opt = per_step(i, opt)
        opt.zero_grad()
        loss(model(X[a:a + batch]), Y[a:a + batch]).backward()
        opt.step()
    return flat(model)


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=rtol, atol=atol)


def net():
    return Net1989(0, act="relu", out_act="none")


class Stop(Exception):
    pass


def _stop_in(pass_idx):
    def progress(p, done, total):
        if p == pass_idx:  # the checkpoint of pass `pass_idx` is on disk by now
            raise Stop
    return progress


# -- the registry itself ---------------------------------------------------------------------
def test_registry_has_at_least_30_methods_with_cards():
    assert len(NAMES) >= 30 and len(set(NAMES)) == len(NAMES)
    for m in list_methods():
        card = m.card()
        assert m.name in card and m.paper in card and "When it runs" in card and "Tested against" in card
        assert len(card.splitlines()) <= 40, m.name  # one screen
        for k, o in m.options.items():
            assert o.parse(m.name, k, str(o.default)) == o.default


@pytest.mark.parametrize("name", NAMES)
def test_switch_implements_exactly_its_declared_hooks(name):
    m = get_method(name)
    sw = build_switch(parse_method(name), rank=m.rank, seed=0)
    implemented = {h for h in HOOKS if any(hasattr(sw, a) for a in np.atleast_1d(HOOK_ATTR[h]))}
    # model-noise methods act in the model's forward (declared 'forward', no wrapper of their own)
    declared = set(m.hooks) - ({"forward"} if m.modnet else set())
    assert implemented == declared, (implemented, declared)


def test_option_parsing_and_digest_canonical():
    a = tiny_cfg("sam", "swa")
    b = apply_overrides(preset("modern_smoke"), BASE + ["+method=swa:start=0.75", "+method=sam:rho=0.05"])
    assert a.digest() == b.digest() and [s.name for s in a.methods] == ["sam", "swa"]
    assert tiny_cfg("sam", over=["+method=swa:start=0.5"]).digest() != a.digest()
    assert from_dict(a.to_dict()).to_json() == a.to_json()
    assert "methods" not in preset("rung5").to_dict()  # configs without methods keep their digests
    for bad, words in [("+method=sam:rho=x", "rho"), ("+method=sam:rh=1", "rh"), ("+method=nosuch", "nosuch"),
                       ("+method=sam:rho=-1", "rho"), ("+method=sam:rho", "rho")]:
        with pytest.raises(UserError, match=words):
            apply_overrides(preset("modern_smoke"), BASE + [bad])


def test_config_clashes_name_the_field():
    for item, field in [("+method=dropout", "model.dropout"), ("+method=shift", "train.shift"),
                        ("+method=cosine", "optim.lr_end"), ("+method=wd", "optim.name=adamw")]:
        with pytest.raises(UserError, match=field):
            apply_overrides(preset("modern_smoke"), [item])
    with pytest.raises(UserError, match="label_smoothing"):
        tiny_cfg("label_smoothing", over=["train.loss=mse", "model.out_act=tanh"])
    per_example = preset("smoke")
    per_example.methods.append(MethodSpec("sam"))
    with pytest.raises(UserError, match="engine=hooked"):
        validate(per_example)
    with pytest.raises(UserError, match="needs one of: resblocks"):
        apply_overrides(preset("modern_smoke"), BASE + ["+method=rezero"])
    with pytest.raises(UserError, match="net1989"):
        apply_overrides(preset("rung6"), ["train.engine=hooked", "+method=batchnorm"])


def test_with_method_replaces_same_slot_and_config_fields():
    c = validate(with_method(preset("modern_smoke"), "cosine"))
    assert c.optim.lr_end is None and [s.name for s in c.methods] == ["cosine"]
    c = validate(with_method(c, "step"))
    assert [s.name for s in c.methods] == ["step"]
    c = validate(with_method(with_method(preset("modern_smoke"), "dropout:p=0.1"), "shift"))
    assert c.model.dropout == 0 and c.train.shift == 0 and {s.name for s in c.methods} == {"dropout", "shift"}


# -- every method alone: a smoke run through train() --------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_method_trains_smoke_run(name, tiny):
    cfg = tiny_cfg(name)
    r = train(cfg, data=tiny)
    assert r.status == "finished" and len(r.history) == 2
    assert all(math.isfinite(f["train_loss"]) and math.isfinite(f["test_loss"]) for f in r.final)
    assert all(np.isfinite(v).all() for v in r.params[0].values())
    assert name in [s.name for s in cfg.methods]


# -- every pair: trains together, or is refused naming both ------------------------------------
def _expected_refusal(a, b):
    ma, mb = get_method(a), get_method(b)
    if (ma.slot and ma.slot == mb.slot) or b in ma.incompatible_with or a in mb.incompatible_with:
        return True
    # the 1989 optimizer is defined for the plain net only
    return any(x == "sdlm" and get_method(y).modnet and y != "nonorm" for x, y in ((a, b), (b, a)))


PAIRS = list(itertools.combinations(NAMES, 2))


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_pair(a, b, tiny):
    if _expected_refusal(a, b):
        with pytest.raises(UserError) as e:
            tiny_cfg(a, b)
        assert a in str(e.value) and b in str(e.value)
        if get_method(a).slot != get_method(b).slot or not get_method(a).slot:
            assert incompatibility(a, b) or "sdlm" in (a, b)
        return
    cfg = tiny_cfg(a, b)
    eng = Population(cfg, [0])
    x, y = tiny.train_x[:32].reshape(-1, 16, 16).numpy(), tiny.train_labels[:32].numpy()
    eng.train_pass(x, y, np.full(32, cfg.optim.lr))
    eng.end_pass()  # 2 steps of 16
    assert eng.t == 2
    assert all(np.isfinite(v).all() for v in eng.params()[0].values())
    assert math.isfinite(eng.evaluate(tiny.test_x, tiny.test_labels, "ce")[0]["loss"])


# -- every method: stop after a pass, resume, same bits -------------------------------------------
RESUME_OPTS = {"swa": "swa:start=0", "ema": "ema:decay=0.5", "adam_sgd": "adam_sgd:at=0.5"}


@pytest.mark.parametrize("name", NAMES)
def test_resume_bit_identical(name, tiny, tmp_path):
    cfg = tiny_cfg(RESUME_OPTS.get(name, name), over=["train.passes=3"])
    full = train(cfg, data=tiny)
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, data=tiny, progress=_stop_in(1))
    assert load_checkpoint(checkpoint_path(cfg, tmp_path))["passes_done"] == 1
    resumed = train(cfg, out=tmp_path, resume=True, data=tiny)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]
    assert [h["test"] for h in resumed.history] == [h["test"] for h in full.history]


def test_population_resume_with_train_randomness_and_many_methods(tiny, tmp_path):
    """Two replicas, train()'s shift and dropout streams, BatchNorm + SWA + SAM + stochastic depth."""
    over = ["train.seeds=2", "train.passes=3", "model.dropout=0.25", "train.shift=1"]
    cfg = tiny_cfg("sam", "swa:start=0", "batchnorm", "stochastic_depth", "rotate_scale", over=over)
    full = train(cfg, data=tiny)
    assert full.final[0]["weights_sha256"] != full.final[1]["weights_sha256"]
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, data=tiny, progress=_stop_in(2))
    resumed = train(cfg, out=tmp_path, resume=True, data=tiny)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]
    # a replica of a population is the same run as alone
    solo = train(tiny_cfg("sam", "swa:start=0", "batchnorm", "stochastic_depth", "rotate_scale",
                          over=over[1:] + ["train.seed=1"]), data=tiny)
    assert solo.final[0]["weights_sha256"] == full.final[1]["weights_sha256"]


def test_vit_on_hooked_engine_takes_training_methods(tiny):
    over = ["train.engine=hooked", "data.n_train=64", "data.n_test=32", "train.passes=1", "train.batch=16",
            "optim.lr_end=none", "+method=sam", "+method=cosine", "+method=agc", "+method=label_smoothing"]
    r = train(apply_overrides(preset("rung6"), over), data=tiny)
    assert r.status == "finished" and math.isfinite(r.final[0]["test_loss"]) and "head_w" in r.params[0]


def test_per_example_preset_with_a_method_runs_batch_one(tiny):
    c = apply_overrides(preset("smoke"), ["train.engine=hooked", "+method=momentum", "data.n_train=64",
                                          "train.passes=1"])
    eng = Population(c, [0])
    eng.train_pass(tiny.train_x.reshape(-1, 16, 16).numpy(), tiny.train_labels.numpy(), np.full(64, 0.03))
    eng.end_pass()
    assert c.train.batch == 1 and eng.t == 64


def test_no_methods_matches_minibatch_engine(tiny):
    over = ["data.n_train=64", "data.n_test=32", "train.passes=2", "train.batch=16"]
    a = train(apply_overrides(preset("modern_smoke"), over), data=tiny)
    b = train(apply_overrides(preset("modern_smoke"), over + ["train.engine=minibatch"]), data=tiny)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6)


# -- commands (in process: main() is what the console script runs) --------------------------------
def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_methods_table_card_and_train(tmp_path, capsys):
    code, out, _ = _cli(capsys, "methods", "--json")
    assert code == 0
    assert [m["name"] for m in json.loads(out.strip().splitlines()[-1])["methods"]] == NAMES
    assert len(out.strip().splitlines()) == len(NAMES) + 3  # header, rows, footer, JSON
    code, out, _ = _cli(capsys, "methods", "sam")
    assert code == 0 and "rho = 0.05" in out and out.startswith("sam  (optimizer")
    code, out, err = _cli(capsys, "train", "modern_smoke", "+method=sam", "+method=ema", "data.n_train=64",
                          "data.n_test=32", "--seeds", "2", "--out", tmp_path, "--json", "--quiet")
    assert code == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["methods"] == ["sam", "ema"] and s["seeds"] == 2 and s["engine"] == "hooked"
    code, out, _ = _cli(capsys, "runs", "--out", tmp_path, "--json")
    assert json.loads(out.strip().splitlines()[-1])["runs"][0]["kind"] == "train"


@pytest.mark.parametrize("args,words", [
    (("methods", "nosuch"), "unknown method 'nosuch'"),
    (("train", "modern_smoke", "+method=nf", "+method=agc"), "methods nf and agc are incompatible"),
    (("train", "modern_smoke", "+method=sgd", "+method=adam"), "methods sgd and adam are incompatible"),
    (("train", "modern_smoke", "+method=sam:rho=big"), "rho='big': expected float"),
    (("train", "nopreset"), "unknown preset"),
])
def test_cli_errors_are_one_line(args, words, capsys):
    code, _, err = _cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and words in err, err
