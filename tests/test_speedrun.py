"""Speedrun: the fused 1989 net against autograd, the preset on the population engine (seeds that
reproduce, a smoke run that learns, methods that compose), the command's records and its
bad-argument errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset
from backproplab.experiments.speedrun import run_speedrun
from backproplab.models import fused1989 as fz
from backproplab.models.net1989 import PARAM_NAMES, Net1989, weights_sha256
from conftest import run_cli


@pytest.fixture(scope="module")
def small():
    return load_dataset("mnist10k", 600, 300)


@pytest.mark.parametrize("dropout,smooth", [(0.0, 0.0), (0.25, 0.1)])
def test_fused_loss_and_gradient_match_autograd(small, dropout, smooth):
    seeds, B = [3, 11], 40
    x, y = small.train_x[:B], small.train_labels[:B]
    g = torch.Generator().manual_seed(5)
    keep = (torch.rand(2, B, 192, generator=g) >= dropout) if dropout else None
    theta = fz.init_theta(seeds)
    scaled = None if keep is None else keep.float() / (1 - dropout)
    loss, grad = fz.loss_and_grad(theta, fz.prep(x).expand(2, -1, -1), y.expand(2, -1), scaled, smooth)
    for r, s in enumerate(seeds):
        net = Net1989(s, act="relu", out_act="none", dropout=dropout)
        ref = F.cross_entropy(net(x, None if keep is None else keep[r]), y, label_smoothing=smooth)
        ref.backward()
        assert abs(float(loss[r]) - float(ref.detach())) < 1e-5
        want = torch.cat([getattr(net, n).grad.reshape(-1) for n in PARAM_NAMES])
        torch.testing.assert_close(grad[r], want, atol=2e-6, rtol=1e-4)


def test_fused_logits_and_param_export_match_net1989(small):
    theta = fz.init_theta([7])
    with torch.no_grad():
        theta.add_(0.05 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1)))
    net = Net1989(0, act="relu", out_act="none")
    params = fz.to_params(theta[0])
    with torch.no_grad():
        for n in PARAM_NAMES:
            getattr(net, n).copy_(torch.from_numpy(params[n]))
        want = net(small.test_x[:64])
    torch.testing.assert_close(fz.logits(theta, fz.prep(small.test_x[:64]))[0], want, atol=1e-5, rtol=1e-5)
    assert weights_sha256(params) == weights_sha256({n: getattr(net, n) for n in PARAM_NAMES})


def small_cfg(*items):
    return apply_overrides(preset("speedrun"), ["data.n_train=600", "data.n_test=300", "train.passes=3",
                                                "train.batch=50", *items])


def test_preset_is_made_of_registered_methods_on_the_population_engine():
    cfg = preset("speedrun")
    assert cfg.train.engine == "population" and [m.name for m in cfg.methods] == ["warmup", "label_smoothing", "tta"]
    assert (cfg.model.act, cfg.model.out_act, cfg.train.loss, cfg.optim.lr_end) == ("relu", "none", "ce", 0.0)


def test_seed_gives_the_same_weights_alone_twice_and_in_a_population(small):
    cfg = small_cfg("model.dropout=0.25")
    quiet = lambda s: None  # noqa: E731
    a = run_speedrun(cfg, small, [4], log=quiet)["per_seed"][0]["weights_sha256"]
    b = run_speedrun(cfg, small, [4], log=quiet)["per_seed"][0]["weights_sha256"]
    pop = run_speedrun(cfg, small, [3, 4], population=True, log=quiet)["per_seed"]
    assert a == b and pop[1]["weights_sha256"] == a and pop[0]["weights_sha256"] != a


def test_smoke_recipe_learns_and_reports_the_plain_error(small):
    res = run_speedrun(small_cfg("train.passes=6", "train.batch=32"), small, [0, 1], population=True,
                       log=lambda s: None)
    assert res["seeds"] == 2 and len({p["weights_sha256"] for p in res["per_seed"]}) == 2
    assert res["test_error"] < 35.0 and res["test_error_no_tta"] < 35.0    # chance is 90 %
    assert res["test_error"] != res["test_error_no_tta"]                   # tta changes the evaluation
    with_sam = run_speedrun(small_cfg("train.passes=6", "train.batch=32", "+method=sam"), small, [0],
                            log=lambda s: None)
    assert with_sam["per_seed"][0]["weights_sha256"] != res["per_seed"][0]["weights_sha256"]
    assert "sam" in [m["name"] for m in with_sam["config"]["methods"]]


def test_cli_smoke_records_a_speedrun(tmp_path):
    r = run_cli("speedrun", "--smoke", "--seeds", "2", "--reference-steps", "3", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["seeds"] == 2 and len(res["per_seed"]) == 2 and res["test_error"] < 60.0
    assert res["reference"]["full_steps"] == 80 * 7291 and res["speedup"] > 0
    assert "mean +- std, n=2" in r.stdout and res["path"] in ("kernel", "fused")
    from backproplab.store import list_runs
    runs = list_runs(tmp_path)
    assert runs[-1]["kind"] == "speedrun" and runs[-1]["summary"]["seeds"] == 2


def test_target_is_the_stores_full_rung5_run_else_the_measured_constant(tmp_path):
    from backproplab.config import preset
    from backproplab.experiments.speedrun import RUNG5_ERROR, rung5_target
    from backproplab.store import add_run
    assert rung5_target(tmp_path)[0] == RUNG5_ERROR  # no store yet
    cfg = preset("rung5")
    add_run(tmp_path, "ladder", "rung5", "finished", cfg.to_dict(), {"test_error": 1.87, "seeds": 4}, [], {})
    small = preset("rung5")
    small.data.n_train = 300
    add_run(tmp_path, "ladder", "rung5", "finished", small.to_dict(), {"test_error": 30.0, "seeds": 2}, [], {})
    err, source = rung5_target(tmp_path)
    assert err == 1.87 and "run 1" in source  # the smoke-size rung 5 is not a target


@pytest.mark.parametrize("args", [["--seeds", "0"], ["--tta", "3"], ["--batch", "0"], ["--lr", "-1"],
                                  ["--reference-steps", "-2"], ["--seeds", "x"], ["--target", "0"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args):
    from backproplab.cli import main
    assert main(["speedrun", "--smoke", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs.db").exists()  # nothing trained, nothing recorded


def test_speedrun_preset_resumes_bit_identical(small, tmp_path):
    """Stopped after its first pass and resumed from the checkpoint: the same weights as one run
    (the population engine's state: weights, Adam's moments, the step count)."""
    from backproplab.engine.train import train
    cfg = small_cfg("train.seeds=2")

    class Stop(Exception):
        pass

    def stop(pass_idx, done, total):
        if pass_idx == 1:
            raise Stop
    full = train(cfg, data=small)
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, data=small, progress=stop)
    resumed = train(cfg, out=tmp_path, resume=True, data=small)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]
    assert resumed.path == full.path
