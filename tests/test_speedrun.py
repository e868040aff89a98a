"""Speedrun: the fused 1989 net against autograd, its optimizers against torch.optim, seeds that
reproduce, a smoke run that learns, the command's records and its bad-argument errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.data import load_dataset, shift_images
from backproplab.experiments.speedrun import (Recipe, optimizer_step, run_speedrun, shifted_copies,
                                              eval_errors, train_population)
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


@pytest.mark.parametrize("name", ["adam", "nesterov"])
def test_optimizer_step_matches_torch_optim(name):
    rc = Recipe(optimizer=name, momentum=0.9, beta2=0.99, weight_decay=0.02)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 40, generator=g)
    p = theta.clone().requires_grad_()
    opt = (torch.optim.AdamW([p], lr=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.02) if name == "adam"
           else torch.optim.SGD([p], lr=1.0, momentum=0.9, nesterov=True, weight_decay=0.02))
    mom, sq = torch.zeros_like(theta), torch.zeros_like(theta)
    for k in range(1, 8):
        grad, lr = torch.randn(3, 40, generator=g), 0.01 * k
        opt.param_groups[0]["lr"] = lr
        p.grad = grad.clone()
        opt.step()
        optimizer_step(rc, theta, grad.clone(), mom, sq, k, lr)
    torch.testing.assert_close(theta, p.detach(), atol=1e-6, rtol=1e-5)


def test_shifted_copies_are_the_nine_one_pixel_translations(small):
    x = small.train_x[:20]
    bank = shifted_copies(x)                                     # (9, 20, 320)
    assert bank.shape[:2] == (9, 20)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    found = set()
    for k in range(9):  # copy k is x translated by one (dy, dx) in [-1, 1]^2, -1 where uncovered
        hits = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if torch.equal(bank[k], fz.prep(padded[..., 1 - dy:17 - dy, 1 - dx:17 - dx]))]
        assert len(hits) == 1, (k, hits)
        found.add(hits[0])
    assert len(found) == 9 and torch.equal(bank[4], fz.prep(x))  # all nine, the centre at index 4


def test_seed_gives_the_same_weights_alone_twice_and_in_a_population(small):
    rc = Recipe(epochs=2, batch=50, dropout=0.25)
    a, _ = train_population(small, [4], rc)
    b, _ = train_population(small, [4], rc)
    pop, _ = train_population(small, [9, 4], rc)
    assert torch.equal(a, b)
    torch.testing.assert_close(pop[1], a[0], atol=1e-5, rtol=1e-5)  # batched products may round differently
    assert not torch.allclose(pop[0], a[0])


def test_smoke_recipe_learns_and_tta_is_a_mean_of_shifts(small):
    res = run_speedrun(small, [0, 1], Recipe(epochs=6, batch=32), population=True, log=lambda s: None)
    assert res["seeds"] == 2 and len({p["weights_sha256"] for p in res["per_seed"]}) == 2
    assert res["test_error"] < 35.0 and res["test_error_no_tta"] < 35.0    # chance is 90 %
    theta, _ = train_population(small, [0], Recipe(epochs=1, batch=32))
    x, n = small.test_x, len(small.test_x)
    prob = sum(torch.softmax(fz.logits(theta, fz.prep(shift_images(x, np.tile(np.array(s), (n, 1))))), -1)
               for s in [(0, 0), (-1, 0), (0, -1), (0, 1), (1, 0)])   # the centre and the four 1-pixel moves
    want = 100.0 * float((prob[0].argmax(1) != small.test_labels).float().mean())
    assert abs(eval_errors(theta, small, 5)[0] - want) < 1e-4


def test_cli_smoke_records_a_speedrun(tmp_path):
    r = run_cli("speedrun", "--smoke", "--seeds", "2", "--reference-steps", "3", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["seeds"] == 2 and len(res["per_seed"]) == 2 and res["test_error"] < 60.0
    assert res["reference"]["full_steps"] == 80 * 7291 and res["speedup"] > 0
    assert "mean +- std, n=2" in r.stdout
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
