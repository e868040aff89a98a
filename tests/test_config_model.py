import numpy as np
import pytest
import torch

from backproplab.config import apply_overrides, from_dict, list_presets, preset, validate
from backproplab.errors import UserError
from backproplab.models import H2_TABLE, MACS, Net1989, init_params, weights_sha256
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


def test_h2_connection_table_is_respected():
    m = Net1989(1)
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    x.requires_grad_(True)
    # Zeroing an input plane's links must change exactly the output planes that see it.
    for o in range(12):
        assert sorted(H2_TABLE[o].tolist()) == sorted(set(H2_TABLE[o].tolist()))
    assert H2_TABLE[0].tolist() == list(range(8)) and H2_TABLE[4].tolist() == list(range(4, 12))
    assert H2_TABLE[8].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    dense = m.h2_dense()
    for o in range(12):
        unseen = sorted(set(range(12)) - set(H2_TABLE[o].tolist()))
        assert torch.all(dense[o, unseen] == 0) and torch.all(dense[o, H2_TABLE[o]] == m.h2_w[o])


def test_init_ranges_and_determinism():
    p = init_params(3)
    for name, fan in (("h1_w", 25), ("h2_w", 200), ("h3_w", 192), ("out_w", 30)):
        b = 2.4 / np.sqrt(fan)
        assert p[name].abs().max() <= b and p[name].abs().max() > 0.9 * b
    assert torch.all(p["out_b"] == -1) and torch.all(p["h1_b"] == 0) and torch.all(p["h3_b"] == 0)
    assert weights_sha256(init_params(3)) == weights_sha256(p) != weights_sha256(init_params(4))


def test_presets_validate():
    for name in list_presets():
        validate(preset(name))


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
    ("train.engine=gpu", "choose one of fast, eager, minibatch"),
    ("train.batch=8", "needs train.engine=minibatch"),
    ("model.name=vit", "needs train.engine=minibatch"),
    ("noequals", "not key=value"),
    ("train.loss=ce", "needs model.out_act=none"),
    ("model.name=convnet", "needs train.engine=minibatch"),
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
