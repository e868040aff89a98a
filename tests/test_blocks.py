"""Efficient blocks of the convnet family: counts against a hand count and the flop counter,
shapes at each resolution, forwards against the same net composed from torch.nn layers."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from backproplab.cli import main
from backproplab.config import Config, apply_overrides, preset
from backproplab.errors import UserError
from backproplab.models import convnet as cn
from backproplab.models.registry import build_model, dropout_units, model_macs


def test_counts_against_a_hand_count():
    # separable, size 2 (w 8, no extra layer): c1 1*8*25+8, c2_dw 8*25+8, c2_pw 8*16+16, head 256*10+10
    assert cn.conv_params(2, "separable") == 208 + 208 + 144 + 2570 == 3130
    assert cn.conv_macs(2, "separable") == 64 * 8 * 25 + 16 * 8 * 25 + 16 * 16 * 8 + 256 * 10 == 20608
    # inverted residual, size 3 (w 12, one residual block on 24 channels, expansion 4)
    hand_p = [1 * 12 * 25 + 12, 12 * 48 + 48, 48 * 25 + 48, 48 * 24 + 24,   # c1, c2 ex/dw/pj
              24 * 96 + 96, 96 * 9 + 96, 96 * 24 + 24, 24 * 16 * 10 + 10]  # c3 ex/dw/pj, head
    hand_m = [64 * 12 * 25, 64 * 48 * 12, 16 * 48 * 25, 16 * 24 * 48, 16 * 96 * 24, 16 * 96 * 9, 16 * 24 * 96, 3840]
    assert cn.conv_params(3, "inverted_residual") == sum(hand_p) == 12898
    assert cn.conv_macs(3, "inverted_residual") == sum(hand_m) == 185088
    # width and resolution: plain, size 2 at width 3 (w 12) and 28 pixels (sides 14 and 7)
    assert cn.conv_params(2, "plain", 3, 28) == (25 * 12 + 12) + (12 * 24 * 25 + 24) + (24 * 49 * 10 + 10)
    assert cn.conv_macs(2, "plain", 3, 28) == 196 * 12 * 25 + 49 * 24 * 12 * 25 + 24 * 49 * 10


@pytest.mark.parametrize("block", cn.BLOCKS)
@pytest.mark.parametrize("size,width,res", [(2, None, 16), (3, None, 20), (3, 2, 28), (5, 1, 16)])
def test_modules_match_the_counts_and_the_torch_layers(block, size, width, res):
    net = cn.ConvNet(3, size=size, block=block, width=width, resolution=res)
    assert sum(p.numel() for p in net.parameters()) == cn.conv_params(size, block, width, res)
    x = torch.rand(5, 1, res, res) * 2 - 1
    with FlopCounterMode(display=False) as fc:
        out = net(x[:1])
    assert fc.get_total_flops() == 2 * cn.conv_macs(size, block, width, res)   # 2 FLOPs a multiply-add
    assert out.shape == (1, 10)
    ref = cn.torch_layers(net)
    assert torch.allclose(net(x), ref(x), atol=1e-5)
    if any(s.get("block_out") for s in net.specs):  # the residual is part of what the reference checks
        with torch.no_grad():
            net.c3_pj_w.mul_(3.0)
        assert not torch.allclose(net(x), ref(x), atol=1e-3)


def test_shapes_by_resolution():
    for res, side in ((16, 4), (20, 5), (28, 7)):
        for block in cn.BLOCKS:
            net = cn.ConvNet(0, size=3, block=block, resolution=res)
            assert net.dropout_units == 2 * 12 * side * side
            assert net(torch.zeros(2, 1, res, res)).shape == (2, 10)
    with pytest.raises(UserError, match="resolution"):
        cn.ConvNet(0, size=2, resolution=3)
    with pytest.raises(UserError, match="wide"):
        cn.layer_specs(2, "wide")


def test_plain_is_the_family_it_was():
    old = cn.ConvNet(7, size=3)
    new = cn.ConvNet(7, size=3, block="plain", width=3)
    assert [n for n, _ in old.named_parameters()] == ["c1_w", "c1_b", "c2_w", "c2_b", "c3_w", "c3_b", "head_w",
                                                      "head_b"]
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))


def test_config_keys_and_registry():
    cfg = apply_overrides(preset("modern"), ["model.name=convnet", "model.block=inverted_residual", "model.width=2"])
    m = build_model(cfg.model, 0)
    assert isinstance(m, cn.ConvNet) and m.block == "inverted_residual"
    assert dropout_units(cfg.model) == m.dropout_units and model_macs(cfg.model) == cn.conv_macs(2, "inverted_residual", 2)
    assert "block" not in Config().to_dict()["model"] and "width" not in Config().to_dict()["model"]
    assert cfg.to_dict()["model"]["block"] == "inverted_residual"
    with pytest.raises(UserError, match="model.block"):
        apply_overrides(preset("modern"), ["model.block=separable"])        # net1989 has no blocks
    with pytest.raises(UserError, match="model.block"):
        apply_overrides(preset("modern"), ["model.name=convnet", "model.block=dense"])


def test_train_command_runs_an_inverted_residual_net(tmp_path, capsys):
    rc = main(["train", "modern", "model.name=convnet", "model.block=inverted_residual", "model.width=2",
               "data.n_train=64", "data.n_test=32", "train.passes=1", "--out", str(tmp_path), "--json", "--quiet"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["status"] == "finished" and 0 <= s["test_error"] <= 100


def test_pareto_front_by_hand():
    from backproplab.experiments.blocks import pareto
    pts = [(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0), (5, 9.0)]
    assert pareto(pts) == [0, 1, 4]          # (15, 6) is beaten by (10, 5); (30, 4) by (20, 4)


def test_study_inputs_at_each_resolution(digits):
    from backproplab.data import load_dataset
    from backproplab.data.sources import canonical_split, load_mnist10k
    from backproplab.experiments.blocks import VAL
    d16, d28 = load_dataset(resolution=16).with_validation(VAL), load_dataset(resolution=28)
    assert torch.equal(d16.test_x, digits.test_x)                    # 16: the engine's 1989 digits
    assert torch.equal(d16.train_x, digits.train_x[:-VAL]) and torch.equal(d16.val_x, digits.train_x[-VAL:])
    images, _ = load_mnist10k()
    src = torch.from_numpy(images[canonical_split()[1]]).float() / 127.5 - 1.0
    assert torch.equal(d28.test_x[:, 0], src)                        # 28: the sources themselves
    d20 = load_dataset(resolution=20)
    assert d20.test_x.shape == (2007, 1, 20, 20) and torch.equal(d20.test_labels, digits.test_labels)
    ref = torch.nn.functional.interpolate(src[:5, None], size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(d20.test_x[:5], ref, atol=1e-6)            # 20: the bilinear resize of the sources
