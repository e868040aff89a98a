"""Distillation (distill) and Learning without Forgetting (lwf): the loss against the paper's
formula and torch.nn.functional, the steps through train() rebuilt by hand, the teacher folder's
bad inputs. Tiny data: the teacher is tests/_teacher.py's 2-seed run on 64 digits."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.cli import main
from backproplab.config import apply_overrides, from_dict, preset
from backproplab.engine.population import Population
from backproplab.engine.train import checkpoint_path
from backproplab.errors import UserError
from backproplab.methods.distill import parse_classes, soft_kl
from backproplab.store import add_run, list_runs

from _teacher import teacher_dir, teacher_result
from test_methods import (LR0, X, Y, assert_telling, assert_weights, descend, forward, grads, init, public_run,
                          run_engine, sgd_steps, tiny, tiny_cfg, xy, close)  # noqa: F401 (tiny: fixture)


def teacher_probs(x, T):
    """Mean over the teacher run's seeds of softmax(z / T), its weights through the hand-written net."""
    ps = [{n: torch.as_tensor(v) for n, v in prm.items()} for prm in teacher_result().params]
    return torch.stack([F.softmax(forward(p, x) / T, -1) for p in ps]).mean(0).detach()


def kl_by_torch(z, p, T):
    # F.kl_div(input = log q, target = p) = sum p (log p - log q); batchmean divides by B
    return T * T * F.kl_div(F.log_softmax(z / T, -1), p, reduction="batchmean")


# -- signatures (test_methods.SIGNATURES): what the method does to a run through train() -------------
def sig_distill(tiny):
    x, y = xy(tiny, 16)
    T, a = 4.0, 0.5
    pt = teacher_probs(x, T)
    loss = lambda z, t: (1 - a) * F.cross_entropy(z, t) + a * kl_by_torch(z, pt, T)  # noqa: E731
    p = init()
    want = descend(p, grads(p, x, y, loss=loss), LR0)
    got = public_run(tiny, f"distill:teacher={teacher_dir()}").params[0]
    assert_weights(got, want)
    assert_telling(want, descend(p, grads(p, x, y), LR0))


def sig_lwf(tiny):
    # the frozen copy is the run's start: step 1's term is 0 (same net), steps 2 and 3 pull toward it
    x, y = xy(tiny, 48)
    p0 = init()
    p = p0
    for t in range(3):
        xb, yb = x[16 * t:16 * t + 16], y[16 * t:16 * t + 16]
        old = F.softmax(forward(p0, xb) / 2.0, -1).detach()
        loss = lambda z, tt, old=old: F.cross_entropy(z, tt) + kl_by_torch(z, old, 2.0)  # noqa: E731
        p = descend(p, grads(p, xb, yb, loss=loss), LR0)
    got = public_run(tiny, "lwf", n=48).params[0]
    assert_weights(got, p)
    assert_telling(p, sgd_steps(init(), x, y, [LR0] * 3, 16)[-1])


# -- oracles (test_methods_oracle.ORACLES) ---------------------------------------------------------
def oracle_distill(name):
    torch.manual_seed(0)
    z, pt = torch.randn(7, 10, requires_grad=True), F.softmax(torch.randn(7, 10), -1)
    for T in (1.0, 4.0, 20.0):
        close(soft_kl(z, pt, T), kl_by_torch(z, pt, T))
        g, = torch.autograd.grad(soft_kl(z, pt, T) * 7, z)  # per example: T (q - p), Hinton eq. 2 times T^2
        close(g, T * (F.softmax(z / T, -1) - pt).detach())
    # the engine's steps: torch.optim.SGD on the weighted criterion with the teacher run's soft targets
    T, a = 20.0, 0.3
    eng = run_engine(tiny_cfg(f"distill:teacher={teacher_dir()},T={T},alpha={a}"), n=48)
    p = init()
    opt = torch.optim.SGD(list(p.values()), 0.05)
    for s in range(0, 48, 16):
        xb, yb = X[s:s + 16], Y[s:s + 16]
        z = forward(p, xb)
        opt.zero_grad()
        ((1 - a) * F.cross_entropy(z, yb) + a * kl_by_torch(z, teacher_probs(xb, T), T)).backward()
        opt.step()
    close(eng.W[0], torch.cat([v.detach().reshape(-1) for v in p.values()]))


def oracle_lwf(name):
    eng = run_engine(tiny_cfg("lwf:lam=2,T=3,classes=0-4"), n=48)
    sw = dict(eng.switches)["lwf"]
    p0 = init()
    close(sw.old[0], torch.cat([v.detach().reshape(-1) for v in p0.values()]))  # the frozen start
    c = eng.ctx
    c.x = X[:32].reshape(1, 32, 1, 16, 16)
    out = torch.stack([eng.models[0](c.x[0])])
    got = sw.loss(c, out, Y[:32], torch.zeros(1))
    old = F.softmax(forward(p0, X[:32])[:, :5] / 3.0, -1)
    want = 2.0 * kl_by_torch(out[0][:, :5], old, 3.0)
    close(got[0], want)
    assert float(want.detach()) > 1e-3  # three steps moved the net away from its start


ORACLES_DISTILL = {"distill": oracle_distill, "lwf": oracle_lwf}


# -- behaviour -------------------------------------------------------------------------------------
def test_cached_targets_equal_live_and_refuse_changed_images(tiny):
    live = public_run(tiny, f"distill:teacher={teacher_dir()}", n=32)
    cached = public_run(tiny, f"distill:teacher={teacher_dir()},targets=cached", n=32)
    for k, v in live.params[0].items():
        np.testing.assert_allclose(cached.params[0][k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="train.shift=0"):
        tiny_cfg(f"distill:teacher={teacher_dir()},targets=cached", over=["train.shift=1"])
    with pytest.raises(UserError, match="a batch method changed it"):
        public_run(tiny, f"distill:teacher={teacher_dir()},targets=cached", "rotate_scale", n=32)


def test_lwf_freezes_the_weights_a_population_starts_from(tiny):
    """A caller that loads pre-trained weights into W before training: each replica's frozen copy is
    the weights it was given, not its init, and a resumed engine keeps it."""
    cfg = tiny_cfg("lwf", over=["train.seeds=2"])
    eng = Population(cfg, [0, 1])
    start = torch.stack([torch.as_tensor(np.concatenate([v.reshape(-1) for v in prm.values()]))
                         for prm in teacher_result().params])
    with torch.no_grad():
        eng.W.copy_(start)
    x, y = tiny.train_x[:32].reshape(-1, 16, 16).numpy(), tiny.train_labels[:32].numpy()
    eng.train_pass(x, y)
    eng.end_pass()
    sw = dict(eng.switches)["lwf"]
    assert torch.equal(sw.old, start) and not torch.equal(eng.W, start)
    again = Population(cfg, [0, 1])
    again.load_state(eng.state())
    for e in (eng, again):
        e.train_pass(x, y)
        e.end_pass()
    assert torch.equal(dict(again.switches)["lwf"].old, start) and torch.equal(again.W, eng.W)


def test_lwf_classes_parse_and_refuse():
    assert parse_classes("all") == list(range(10)) and parse_classes("5-9") == [5, 6, 7, 8, 9]
    for bad, words in [("lwf:classes=3", "one output unit"), ("lwf:classes=4-12", "4-12"),
                       ("lwf:classes=x", "'x'")]:
        with pytest.raises(UserError, match=words):
            tiny_cfg(bad)


def _teacher_copy(tmp_path, **change):
    """A copy of the teacher folder whose run record says other config fields (same weights)."""
    rec = list_runs(teacher_dir())[-1]
    cfg = from_dict(rec["config"])
    old_ckpt = checkpoint_path(cfg, Path(teacher_dir()))
    for k, v in change.items():
        sec, key = k.split(".")
        setattr(getattr(cfg, sec), key, v)
    folder = tmp_path / "teacher"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(old_ckpt, checkpoint_path(cfg, folder))
    add_run(folder, "train", cfg.name, "finished", cfg.to_dict(), rec["summary"], rec["history"], {})
    return folder


def test_bad_teacher_folders_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = _teacher_copy(tmp_path, **{"data.source": str(tmp_path / "idx")})
    cases = [(f"distill:teacher={empty}", f"teacher={empty}: no finished population run"),
             (f"distill:teacher={tmp_path / 'nope'}", "no such folder"),
             ("distill", "needs teacher=DIR"),
             (f"distill:teacher={other}", "at 16x16, this run sees mnist10k")]
    for spec, words in cases:
        code = main(["train", "modern_smoke", f"+method={spec}", "data.n_train=64", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, err
    assert list_runs(teacher_dir())[-1]["status"] == "finished"  # the teacher's record is as it was


def test_teacher_must_give_logits(tmp_path):
    folder = _teacher_copy(tmp_path, **{"train.loss": "mse", "model.out_act": "tanh"})
    with pytest.raises(UserError, match="needs logits"):
        apply_overrides(preset("modern_smoke"), [f"+method=distill:teacher={folder}"])
