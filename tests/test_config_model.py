import numpy as np
import pytest
import torch

from backproplab.config import apply_overrides, from_dict, list_presets, preset, validate
from backproplab.errors import UserError
from backproplab.models import H2_TABLE, MACS, Net1989, init_params, weights_sha256
from backproplab.models.modnet import ModNet
from backproplab.models.net1989 import PARAM_NAMES


def test_parameter_counts_per_layer():
    m = Net1989(0)
    counts = {n: getattr(m, n).numel() for n in PARAM_NAMES}
    assert counts["h1_w"] + counts["h1_b"] == 1068
    assert counts["h2_w"] + counts["h2_b"] == 2592
    assert counts["h3_w"] + counts["h3_b"] == 5790
    assert counts["out_w"] + counts["out_b"] == 310
    assert sum(p.numel() for p in m.parameters()) == 9760


def test_macs_by_counting_hooks():
    # Count multiply-adds from the actual layer shapes: (outputs) x (inputs seen per output).
    m, x = Net1989(0), torch.zeros(1, 1, 16, 16)
    h2_links = (m.h2_dense().abs().sum(dim=(2, 3)) > 0).sum().item()  # connections plane->plane
    assert h2_links == 12 * 8
    macs = 12 * 8 * 8 * 25 + 4 * 4 * h2_links * 25 + m.h3_w.numel() + m.out_w.numel()
    assert macs == MACS == 63_660
    assert m(x).shape == (1, 10)


SEES = {**{o: list(range(0, 8)) for o in range(4)}, **{o: list(range(4, 12)) for o in range(4, 8)},
        **{o: [0, 1, 2, 3, 8, 9, 10, 11] for o in range(8, 12)}}  # SPEC section 1: H2 plane -> H1 planes


def test_h2_connection_table_matches_the_spec():
    for o in range(12):
        assert H2_TABLE[o].tolist() == SEES[o]
    m = Net1989(1)
    dense = m.h2_dense()
    for o in range(12):
        unseen = sorted(set(range(12)) - set(SEES[o]))
        assert torch.all(dense[o, unseen] == 0) and torch.all(dense[o, SEES[o]] == m.h2_w[o])


@pytest.mark.parametrize("make", [Net1989, ModNet], ids=["Net1989", "ModNet"])
def test_h2_connection_table_is_respected(make):
    # In the forward pass itself: with H3 reading only H2 plane o (the other columns of h3_w zeroed),
    # the net's outputs are a function of that plane. Moving H1 plane c (through its biases: tanh is
    # strictly monotone) must change them exactly when plane o sees plane c.
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for o in range(12):
        m = make(1)
        with torch.no_grad():
            cols = torch.zeros(192, dtype=torch.bool)
            cols[o * 16:(o + 1) * 16] = True
            m.h3_w[:, ~cols] = 0.0
        start = m.h1_b.detach().clone()
        with torch.no_grad():
            ref = m(x)
            for c in range(12):
                m.h1_b.copy_(start)
                m.h1_b[c] += 0.5
                out = m(x)
                if c in SEES[o]:
                    assert (out - ref).abs().max() > 1e-4, (o, c)
                else:
                    assert torch.equal(out, ref), (o, c)


def test_init_ranges_and_determinism():
    p = init_params(3)
    for name, fan in (("h1_w", 25), ("h2_w", 200), ("h3_w", 192), ("out_w", 30)):
        b = 2.4 / np.sqrt(fan)
        assert p[name].abs().max() <= b and p[name].abs().max() > 0.9 * b
    assert torch.all(p["out_b"] == -1) and torch.all(p["h1_b"] == 0) and torch.all(p["h3_b"] == 0)
    assert weights_sha256(init_params(3)) == weights_sha256(p) != weights_sha256(init_params(4))


def _fields(cfg):
    return {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() if isinstance(d, dict) for k, v in d.items()}


# SPEC section 2, "Time travel": each rung is the one before plus one change (rung1b: the paper's own
# optimizer and scaled tanh; rung6: the rung-5 recipe on the micro-ViT matched to the 1989 net);
# modern is rung 5 in minibatches on the population engine; the smoke presets only shrink the run
PRESET_CHANGES = [
    ("rung1", "lecun1989", {}),
    ("rung1b", "rung1", {"model.act": "scaled_tanh", "model.out_act": "scaled_tanh", "optim.name": "sdlm",
                         "optim.lr": 0.0005}),
    ("rung2", "rung1", {"model.out_act": "none", "train.loss": "ce", "optim.lr": 0.01}),
    ("rung3", "rung2", {"optim.name": "adamw", "optim.lr": 3e-4, "optim.lr_end": 1e-4, "optim.weight_decay": 0.01,
                        "train.passes": 46}),
    ("rung4", "rung3", {"train.shift": 1, "train.passes": 60}),
    ("rung5", "rung4", {"model.dropout": 0.25, "model.act": "relu", "train.passes": 80}),
    ("rung6", "rung5", {"model.name": "vit", "train.batch": 32, "optim.lr": 2e-3}),
    ("modern", "rung5", {"train.batch": 32, "optim.lr": 6e-3}),
    ("smoke", "lecun1989", {"data.n_train": 500, "data.n_test": 200, "train.passes": 2}),
    ("modern_smoke", "modern", {"data.n_train": 500, "data.n_test": 200, "train.passes": 2}),
    # the speedrun (values chosen on data.val, see README), plus its methods, checked below
    ("speedrun", "modern", {"train.batch": 128, "train.passes": 40, "model.dropout": 0.0, "optim.lr": 0.04,
                            "optim.lr_end": 0.0, "optim.beta2": 0.99, "optim.weight_decay": 0.0,
                            "train.eval_every": 40}),
    ("rung7", "modern", {}),  # the modern config itself; its methods (tta, ema) are checked below
    # the diagonal SSM on the modern recipe without shifts (its docstring: dim 32, no dropout, 10 passes,
    # 2e-2, chosen on validation by scripts/ssm_variants.py)
    ("ssm", "modern", {"model.name": "ssm", "model.dim": 32, "model.dropout": 0.0, "train.shift": 0,
                       "train.passes": 10, "optim.lr": 2e-2}),
]


def test_presets_are_what_the_spec_says():
    base = _fields(preset("lecun1989"))  # SPEC section 1: tanh everywhere, MSE on +-1, per-example SGD 0.03, 23 passes
    want = {"model.name": "net1989", "model.act": "tanh", "model.out_act": "tanh", "model.dropout": 0.0,
            "train.loss": "mse", "optim.name": "sgd", "optim.lr": 0.03, "optim.lr_end": None, "train.passes": 23,
            "train.batch": 1, "train.shift": 0, "data.source": "mnist10k", "data.n_train": None, "data.n_test": None}
    assert {k: base[k] for k in want} == want
    assert sorted({n for n, _, _ in PRESET_CHANGES} | {"lecun1989"}) == list_presets()
    for name, before, change in PRESET_CHANGES:
        a, b = _fields(preset(name)), _fields(preset(before))
        if name in ("rung6", "modern"):  # and minibatches: an engine other than the per-example ones
            assert a["train.engine"] not in ("fast", "eager") and b["train.engine"] == "fast"
            a["train.engine"] = b["train.engine"]
        assert {k: v for k, v in a.items() if b[k] != v} == change, name
        assert preset(name).name == name
        validate(preset(name))
    assert [(m.name, m.options) for m in preset("speedrun").methods] == [
        ("warmup", {"frac": 0.2}), ("label_smoothing", {"eps": 0.1}), ("tta", {"n": 9})]
    assert [(m.name, m.options) for m in preset("rung7").methods] == [("tta", {}), ("ema", {})]
    assert all(not preset(n).methods for n in list_presets() if n not in ("speedrun", "rung7"))
    r3 = _fields(preset("rung3"))  # AdamW with torch's defaults
    assert (r3["optim.beta1"], r3["optim.beta2"], r3["optim.eps"]) == (0.9, 0.999, 1e-8)


@pytest.mark.parametrize("override,msg", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.lr=1", "unknown config section 'nosuch'"),
    ("lr=1", "unknown config key 'lr'"),
    ("optim.lr=abc", "optim.lr='abc': expected float"),
    ("optim.lr=nan", "optim.lr='nan': must be a finite number"),
    ("optim.lr=-inf", "optim.lr='-inf': must be a finite number"),
    ("train.passes=1.5", "train.passes='1.5': expected int"),
    ("train.passes=0", "train.passes=0: must be >= 1"),
    ("train.seeds=-3", "train.seeds=-3"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("model.act=sigmoid", "model.act='sigmoid': choose one of"),
    ("train.engine=gpu", "choose one of fast, eager, "),
    ("train.batch=8", "train.batch=8 needs train.engine="),
    ("model.name=vit", "model.name=vit needs train.engine="),
    ("noequals", "not key=value"),
    ("train.loss=ce", "needs model.out_act=none"),
    ("model.name=convnet", "model.name=convnet needs train.engine="),
])
def test_bad_overrides(override, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(".", r"\.").replace("+", r"\+")):
        apply_overrides(preset("lecun1989"), [override])


def test_overrides_and_round_trip():
    c = apply_overrides(preset("lecun1989"), ["optim.lr=3e-4", "optim.lr_end=none", "data.n_train=100"])
    assert c.optim.lr == 3e-4 and c.optim.lr_end is None and c.data.n_train == 100
    assert from_dict(c.to_dict()) == c and from_dict(c.to_dict()).digest() == c.digest()
    with pytest.raises(UserError, match="unknown config key"):
        from_dict({**c.to_dict(), "optim": {"lr": 1.0, "momentum": 0.9}})


def test_convnet_family_is_a_model_choice():
    from backproplab.models.convnet import conv_params
    from backproplab.models.registry import build_model, model_card
    c = apply_overrides(preset("modern"), ["model.name=convnet", "model.depth=3"])
    assert sum(p.numel() for p in build_model(c.model, 0).parameters()) == conv_params(3) == 16594
    assert model_card(c.model)["params"] == 16594
    with pytest.raises(UserError, match="needs model.act=relu and model.out_act=none"):
        apply_overrides(preset("modern"), ["model.name=convnet", "model.act=tanh"])
    with pytest.raises(UserError, match="convnet size must be an integer from 1 to 64"):
        build_model(apply_overrides(preset("modern"), ["model.name=convnet", "model.depth=65"]).model, 0)
