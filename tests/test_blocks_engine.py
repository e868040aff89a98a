"""Input resolutions other than 16 on the one population engine (data.resolution), and the blocks
study's cells as engine runs: training at 20x20, replica k against a solo run of seed k,
bit-identical resume at 28x28, refusals, and the digests of configs at the default side."""
import json

import numpy as np
import pytest

from backproplab.cli import main
from backproplab.config import apply_overrides, from_dict, list_presets, preset
from backproplab.data import load_dataset
from backproplab.engine.population import Population
from backproplab.engine.train import train
from backproplab.errors import UserError
from backproplab.models import convnet as cn
from conftest import Stop, stop_in

CONV = ["model.name=convnet", "train.eval_every=100"]


def _cfg(*over):
    return apply_overrides(preset("modern"), CONV + list(over))


def test_a_20x20_convnet_trains_on_the_engine():
    cfg = _cfg("data.resolution=20", "model.dropout=0", "train.shift=0", "optim.lr=3e-3", "train.passes=3",
               "data.n_train=200", "data.n_test=20")
    data = load_dataset("mnist10k", 200, 20, resolution=20)
    assert tuple(data.train_x.shape[1:]) == (1, 20, 20)
    pop = Population(cfg, [0])
    assert pop.models[0].resolution == 20 and pop.dropout_units == cn.layer_specs(2, resolution=20)[-1]["cin"]
    before = pop.evaluate(data.train_x, data.train_labels, "ce")[0]["loss"]
    res = train(cfg, data=data)
    after = res.final[0]["train_loss"]
    assert res.path == "autograd" and res.status == "finished"
    assert after < 0.8 * before, (before, after)   # ln 10 = 2.30 at the start
    # the run's weights are the 20x20 net's: its head reads 2 w 5 x 5 features
    assert res.params[0]["head_w"].shape == (10, 2 * 8 * 5 * 5)


def test_replica_k_equals_a_solo_run_of_seed_k_at_20():
    over = ["data.resolution=20", "model.block=separable", "train.passes=2", "data.n_train=96", "data.n_test=16"]
    data = load_dataset("mnist10k", 96, 16, resolution=20)
    pop = train(_cfg(*over, "train.seeds=2"), data=data)   # dropout 0.25 and shifts of 1: modern's
    for k in (0, 1):
        solo = train(_cfg(*over, f"train.seed={k}"), data=data)
        for name, v in solo.params[0].items():
            np.testing.assert_allclose(pop.params[k][name], v, rtol=1e-4, atol=2e-6, err_msg=f"seed {k} {name}")
        assert abs(pop.final[k]["test_loss"] - solo.final[0]["test_loss"]) < 1e-4
    assert not np.allclose(pop.params[0]["c1_w"], pop.params[1]["c1_w"])   # two seeds, two nets


def test_resume_at_28_is_bit_identical(tmp_path):
    cfg = _cfg("data.resolution=28", "model.depth=3", "model.block=inverted_residual", "train.passes=3",
               "data.n_train=64", "data.n_test=16", "train.seeds=2", "train.eval_every=1")
    data = load_dataset("mnist10k", 64, 16, resolution=28)
    full = train(cfg, data=data)
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, data=data, progress=stop_in(1))   # stopped in pass 2, pass 1 checkpointed
    resumed = train(cfg, out=tmp_path, resume=True, data=data)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]
    assert [{k: v for k, v in h.items() if not k.startswith("seconds")} for h in resumed.history] == \
        [{k: v for k, v in h.items() if not k.startswith("seconds")} for h in full.history]
    # a checkpoint of another resolution is another run: it does not resume this one
    other = _cfg("data.resolution=20", "model.depth=3", "model.block=inverted_residual", "train.passes=3",
                 "data.n_train=64", "data.n_test=16", "train.seeds=2", "train.eval_every=1")
    assert other.digest() != cfg.digest()


def test_net1989_at_20_is_refused_in_one_line(tmp_path, capsys):
    rc = main(["train", "modern", "data.resolution=20", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "net1989" in err[0] and "data.resolution=20" in err[0]
    assert not (tmp_path / "runs.db").exists() and not any((tmp_path / "checkpoints").glob("*"))
    for model in ("vit", "ssm"):
        with pytest.raises(UserError, match=f"model.name={model} takes 16x16 inputs only"):
            apply_overrides(preset("rung6" if model == "vit" else "ssm"), ["data.resolution=28"])
    with pytest.raises(UserError, match="data.resolution=24"):
        _cfg("data.resolution=24")
    cfg = preset("modern")          # past validation: the engine itself refuses the net
    cfg.data.resolution = 20
    with pytest.raises(UserError, match="net1989.*20"):
        Population(cfg, [0])
    with pytest.raises(UserError, match="20x20 pixels; data.resolution=16"):   # data of another side
        train(_cfg("data.n_train=32", "data.n_test=8", "train.passes=1"),
              data=load_dataset("mnist10k", 32, 8, resolution=20))


# digests of the presets computed by the config module before data.resolution existed (commit 7a15834)
# digests computed by config.py before data.resolution existed (7a15834); the ssm preset was
# re-chosen since (its own change of recipe), so it is checked only for the missing key below
OLD_DIGESTS = {"lecun1989": "955f8dcc80a5", "modern": "d8498638b886", "speedrun": "c07d7e3832e3",
               "rung6": "37dc2962e673"}


def test_the_default_resolution_keeps_every_digest():
    for name, digest in OLD_DIGESTS.items():
        assert preset(name).digest() == digest, name
        assert apply_overrides(preset(name), ["data.resolution=16"]).digest() == digest, name
    for name in list_presets():
        assert "resolution" not in preset(name).to_dict()["data"], name
    at20 = _cfg("data.resolution=20")
    assert at20.to_dict()["data"]["resolution"] == 20 and at20.digest() != _cfg().digest()
    assert from_dict(json.loads(at20.to_json())).digest() == at20.digest()


def test_a_blocks_cell_is_an_engine_run_in_the_store(tmp_path):
    from backproplab.experiments import blocks
    from backproplab.store import list_runs
    cfg = blocks.cell_config("separable", 1, seeds=2, passes=1, smoke=True)
    assert cfg.name == "blocks-L1-separable" and (cfg.data.resolution, cfg.model.block, cfg.model.depth, cfg.model.width) == (20, "separable", 3, 3)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.batch, cfg.model.dropout, cfg.train.shift) == \
        ("adamw", 3e-3, 32, 0.0, 0)
    res, run_id = blocks.train_cell(cfg, tmp_path)
    runs = list_runs(tmp_path)
    assert [(r["id"], r["kind"], r["summary"]["config_digest"]) for r in runs] == [(run_id, "blocks", cfg.digest())]
    assert res.config["data"]["resolution"] == 20 and runs[0]["config"]["data"]["resolution"] == 20
    # the same call as any engine run: train() on the config gives the same weights
    direct = train(cfg)
    assert [f["weights_sha256"] for f in direct.final] == [f["weights_sha256"] for f in res.final]
    again, again_id = blocks.train_cell(cfg, tmp_path)    # a finished cell is read back, stored once
    assert again_id == run_id and len(list_runs(tmp_path)) == 1
    assert [f["weights_sha256"] for f in again.final] == [f["weights_sha256"] for f in res.final]
