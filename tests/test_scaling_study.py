"""Scaling studies (issue 5): parameter and FLOP counts against the modules and
torch.utils.flop_counter, the population trainer against torch.optim, the exactly-once
sampler across a SIGKILL, the study through the CLI (skip on rerun, budget), bad input."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from backproplab.cli import main
from backproplab.data.sampler import EpochSampler, examples_for
from backproplab.errors import UserError
from backproplab.models.net1989 import N_PARAMS
from backproplab.scaling.cells import _next_rates
from backproplab.scaling.families import FAMILIES, member
from backproplab.scaling.study import parse_budget, trim
from backproplab.scaling.trainer import CellTrainer
from backproplab.store import add_run, list_runs
from conftest import ROOT, run_cli


# -- counts --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_params_and_training_flops_match_module_and_flop_counter(family, size):
    m = member(family, size)
    model = m.build(0)
    assert m.params == sum(p.numel() for p in model.parameters())
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 4, 9])
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    assert fc.get_total_flops() == 3 * m.train_flops          # exact: the same matmuls and convolutions
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    assert fc.get_total_flops() == 3 * 2 * m.macs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_1989_net_size_lies_inside_each_family(family):
    sizes = [member(family, s).params for s in range(1, 7)]
    assert sizes == sorted(sizes) and sizes[0] < N_PARAMS < sizes[-1]


# -- the population trainer ------------------------------------------------------------------
@pytest.mark.parametrize("family,optim,lrs", [("convnet", "sgd", [0.01, 0.08]), ("vit", "adamw", [1e-3, 4e-3])])
def test_population_equals_torch_optim_with_cosine_schedule(digits, family, optim, lrs):
    x, y = digits.train_x[:120], digits.train_labels[:120]
    m = member(family, 1)
    tr = CellTrainer(m, lrs, x, y, 0.75, optim=optim, batch=16, weight_decay=1e-3)
    batches = []
    tr.on_batch = lambda step, idx: batches.append(idx.copy())
    tr.run()
    assert tr.steps == len(batches) == math.ceil(90 / 16) and len(batches[-1]) == 90 - 5 * 16
    for r, lr in enumerate(lrs):
        ref = m.build(0)
        opt = (torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3) if optim == "sgd"
               else torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=1e-3))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tr.steps)
        for idx in batches:
            opt.zero_grad()
            F.cross_entropy(ref(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        want = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        keep = torch.ones_like(want, dtype=torch.bool)
        if family == "vit":
            # The key bias has zero true gradient (softmax ignores a shift shared by all keys);
            # Adam turns its rounding noise into steps of +-lr, so it is left out.
            off = 0
            for name, p in ref.named_parameters():
                if name.endswith("qkv_b"):
                    d = p.numel() // 3
                    keep[off + d: off + 2 * d] = False
                off += p.numel()
        assert torch.allclose(tr.W[r][keep], want[keep], atol=2e-6, rtol=1e-5), (family, lr)


def test_sweep_extends_past_an_edge_and_stops_inside():
    spec = {"lrs": [0.01, 0.02, 0.04], "extend": 2, "max_extend": 2}
    pop = lambda lrs, losses: {"results": [{"lr": a, "val_loss": b, "status": "finished"}  # noqa: E731
                                           for a, b in zip(lrs, losses)]}
    assert _next_rates([], spec) == [0.01, 0.02, 0.04]
    assert _next_rates([pop([0.01, 0.02, 0.04], [3, 2, 1])], spec) == [0.08, 0.16]
    assert _next_rates([pop([0.01, 0.02, 0.04], [1, 2, 3])], spec) == [0.005, 0.0025]
    assert _next_rates([pop([0.01, 0.02, 0.04], [2, 1, 3])], spec) == []
    three = [pop([0.01], [3]), pop([0.02], [2]), pop([0.04], [1])]
    assert _next_rates(three, spec) == []                     # max_extend reached


# -- the sampler ----------------------------------------------------------------------------
def test_sampler_permutes_each_epoch_and_handles_fractions():
    s = EpochSampler(10, seed=3)
    got = s.take(25)                                          # 2.5 epochs across boundaries
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:20]) == list(range(10))
    assert len(set(got[20:])) == 5 and not np.array_equal(got[:10], got[10:20])
    assert np.array_equal(got[:10], np.random.default_rng([3, 0]).permutation(10))
    st = s.state_dict()
    t = EpochSampler(10, seed=3)
    t.load_state_dict(st)
    assert np.array_equal(t.take(7), s.take(7))
    assert examples_for(0.25, 7291) == 1823 and examples_for(8, 100) == 800
    with pytest.raises(UserError):
        t.load_state_dict({**st, "seed": 4})


def fake_digits():
    g = torch.Generator().manual_seed(5)     # 60 random images: the counts, not the accuracy, matter here
    return torch.rand(60, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (60,), generator=g)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from test_scaling_study import fake_digits as digits
    from backproplab.scaling.families import member
    from backproplab.scaling.trainer import CellTrainer
    ckpt, log, final, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seeds = [int(v) for v in sys.argv[5].split(",")]
    x, y = digits()
    tr = CellTrainer(member("convnet", 1), [0.02, 0.05], x, y, 2.5, batch=8, ckpt=ckpt, ckpt_steps=3,
                     tag="kill-test", seeds=seeds)
    f = open(log, "a")
    def on_batch(step, idx):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)              # mid-epoch, two steps after a checkpoint
        idx = idx.reshape(len(seeds), -1)                     # each seed's batch
        f.write(f"{step} {' | '.join(' '.join(map(str, i)) for i in idx)}\\n"); f.flush()
    tr.on_batch = on_batch
    tr.run()
    torch.save(tr.W, final)
""")


@pytest.mark.parametrize("seeds", ["0", "0,1,2"])
def test_sampler_exactly_once_per_epoch_across_sigkill(tmp_path, seeds):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    ckpt, log, final = tmp_path / "c.ckpt", tmp_path / "batches.log", tmp_path / "W.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    first = subprocess.run([sys.executable, str(script), ckpt, log, final, "11", seeds], env=env, timeout=300)
    assert first.returncode == -signal.SIGKILL and ckpt.exists() and not final.exists()
    second = subprocess.run([sys.executable, str(script), ckpt, log, final, "-1", seeds], env=env, timeout=300)
    assert second.returncode == 0
    lines = [ln.split(" ", 1) for ln in log.read_text().splitlines()]
    steps = [int(ln[0]) for ln in lines]
    assert steps[:11] == list(range(11)) and steps[11:14] == [9, 10, 11]   # resumed from the step-9 checkpoint
    last = {int(ln[0]): [[int(v) for v in part.split()] for part in ln[1].split("|")] for ln in lines}
    S = len(seeds.split(","))
    streams = [np.concatenate([last[s][k] for s in range(len(last))]) for k in range(S)]   # the batches that count
    for stream in streams:                                    # every seed's own order, exactly once per epoch
        assert len(stream) == examples_for(2.5, 60) == 150
        for e in range(2):
            assert sorted(stream[60 * e: 60 * (e + 1)]) == list(range(60))
        assert len(set(stream[120:])) == 30
    assert all(not np.array_equal(streams[0], st) for st in streams[1:])
    # The same weights as a run never killed.
    ref = CellTrainer(member("convnet", 1), [0.02, 0.05], *fake_digits(), 2.5, batch=8,
                      seeds=[int(v) for v in seeds.split(",")])
    ref.run()
    assert torch.equal(torch.load(final), ref.W)


# -- the study through the CLI ------------------------------------------------------------------
def test_smoke_study_budget_resume_skip_and_fit(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["scale", "run", "--smoke", "--jobs", "1", "--budget", "0.3s", "--out", str(out), "--json"]) == 0
    s1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s1["cells"] == 12 and 1 <= s1["ran"] == s1["to_run"] and s1["ran"] + s1["dropped_by_budget"] == 12
    r2 = run_cli("scale", "run", "--smoke", "--jobs", "2", "--out", out, "--json")      # the worker pool
    s2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert s2["already_done"] == s1["ran"] and s2["ran"] == 12 - s1["ran"]
    stale = out / "scale_ckpt" / f"{list_runs(out)[0]['config']['cell']}.sweep.json"
    stale.parent.mkdir(exist_ok=True)
    stale.write_text("{}")                                    # as if killed between recording and cleaning up
    assert main(["scale", "run", "--smoke", "--out", str(out), "--json"]) == 0      # in process: cheaper
    s3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s3["already_done"] == 12 and s3["ran"] == 0
    recs = [r for r in list_runs(out) if r["kind"] == "scale"]
    keys = [r["config"]["cell"] for r in recs]
    assert len(recs) == 12 and len(set(keys)) == 12           # none run twice, none lost
    for r in recs:
        s = r["summary"]
        assert s["D"] == examples_for(s["epochs"], s["n_train"])
        assert s["C"] == member("convnet", s["size"]).train_flops * s["D"] and s["N"] == member("convnet", s["size"]).params
        ok = [x for x in s["sweep"] if x["status"] == "finished"]
        best = min(ok, key=lambda x: x["val_loss"])              # the sweep on seed 0 chooses the rate
        assert s["lr"] == best["lr"] and s["val_loss_seeds"][0] == best["val_loss"] and len(s["sweep"]) == 2
        assert len(s["val_loss_seeds"]) == 3 and s["loss"] == pytest.approx(np.mean(s["val_loss_seeds"]))
    assert not list((out / "scale_ckpt").glob("*"))          # scratch files are gone
    assert main(["scale", "fit", str(out / "runs.db"), "--n-boot", "8", "--json"]) == 0
    text = capsys.readouterr().out
    rep = json.loads(text.strip().splitlines()[-1])
    fam = rep["families"]["convnet"]
    assert fam["n_cells"] == 12 and fam["n_runs"] == 24 and math.isfinite(fam["frontier"]["slope"])
    assert set(fam["chinchilla"]["constants"]) == {"E", "A", "B", "alpha", "beta"}
    assert "extrapolation" in fam and "Chinchilla" in text and "frontier" in text
    for png in rep["plots"].values():
        assert os.path.getsize(png) > 1000
    assert [r["kind"] for r in list_runs(out)].count("scale_fit") == 1
    # Another seed's cells are other cells: none of them counts as done in this store.
    assert main(["scale", "run", "--smoke", "--seed", "1", "--plan", "--out", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["already_done"] == 0 and plan["to_run"] == 12 and plan["digest"] != s3["digest"]


# -- bad input ------------------------------------------------------------------------------
def _error(capsys, *argv):
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_fit_refuses_empty_foreign_and_small_stores(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert "not a backproplab results store" in _error(capsys, "scale", "fit", empty)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    assert "not a backproplab results store" in _error(capsys, "scale", "fit", foreign)
    assert foreign.read_bytes() == before
    small = tmp_path / "small"
    small.mkdir()
    for i, size in enumerate((1, 2)):
        m = member("convnet", size)
        add_run(small, "scale", f"c{i}", "finished", {}, {"N": m.params, "D": 100, "C": m.train_flops * 100,
                                                          "loss": 1.0, "lr": 0.1, "epochs": 1}, [], {})
    err = _error(capsys, "scale", "fit", small / "runs.db")
    assert "too few runs" in err and ">= 10 runs" in err and ">= 3 distinct N" in err
    assert "no results store" in _error(capsys, "scale", "fit", tmp_path / "missing.db")
    assert "--synthetic" in _error(capsys, "scale", "fit")


def test_run_refuses_bad_budget_family_and_data(tmp_path, capsys):
    out = tmp_path / "o"
    assert "too small for one cell" in _error(capsys, "scale", "run", "--smoke", "--budget", "0.0001s", "--out", out)
    assert "30m" in _error(capsys, "scale", "run", "--smoke", "--budget", "soon", "--out", out)
    assert "choose one of convnet, vit" in _error(capsys, "scale", "run", "--family", "resnet", "--out", out)
    assert "no such file" in _error(capsys, "scale", "run", "--data", tmp_path / "nope", "--out", out)
    assert "size must be an integer from 1" in _error(capsys, "scale", "run", "--sizes", "99", "--out", out)
    assert "--seed must be >= 0" in _error(capsys, "scale", "run", "--seed", "-1", "--out", out)
    assert "distinct seeds >= 0" in _error(capsys, "scale", "run", "--seeds", "1,-1", "--out", out)
    assert not (out / "runs.db").exists()
    assert parse_budget("30m") == 1800 and parse_budget("1.5h") == 5400 and parse_budget("90") == 90


def test_trim_keeps_cheapest_cells_within_budget():
    cells = [{"key": str(i), "projected_s": float(c), "family": "convnet", "size": 1, "n_train": 1, "epochs": 1}
             for i, c in enumerate([5, 1, 3, 8, 2])]
    kept, dropped = trim(cells, budget=3.0, jobs=2)           # (1 + 2 + 3) / 2 = 3 fits, + 5 does not
    assert sorted(c["projected_s"] for c in kept) == [1, 2, 3] and len(dropped) == 2
    assert trim(cells, None, 1) == (cells, [])
    with pytest.raises(UserError, match="too small for one cell"):
        trim(cells, budget=0.5, jobs=1)


def test_fit_synthetic_through_cli(capsys):
    assert main(["scale", "fit", "--synthetic", "--n-boot", "10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["target_met"] and res["errors"]["alpha_abs"] <= 0.02


def test_one_job_trains_on_one_thread_and_restores_the_setting(tmp_path, monkeypatch):
    import backproplab.scaling.study as study_mod
    seen = []

    def fake_run_cell(c, spec, data, out):                    # what the thread setting is while a cell trains
        seen.append(torch.get_num_threads())
        return {"status": "finished", "summary": {"size": c["size"], "n_train": c["n_train"], "epochs": c["epochs"],
                                                  "lr": None, "best_at_edge": False, "loss": None, "seconds": 0.0}}

    monkeypatch.setattr(study_mod, "run_cell", fake_run_cell)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        st = study_mod.make_study("convnet", smoke=True, sizes="1", n_avail=7291)
        study_mod.run_study(st, tmp_path, jobs=1, log=lambda line: None)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- methods in a scaling cell ---------------------------------------------------------------------
def test_a_cell_takes_registered_methods_and_they_change_it(digits):
    from backproplab.config import MethodSpec
    x, y = digits.train_x[:96], digits.train_labels[:96]
    plain = CellTrainer(member("convnet", 1), [0.02, 0.05], x, y, 1.0, batch=16)
    smooth = CellTrainer(member("convnet", 1), [0.02, 0.05], x, y, 1.0, batch=16,
                         methods=[MethodSpec("label_smoothing", {"eps": 0.2})])
    sgd = CellTrainer(member("convnet", 1), [0.02, 0.05], x, y, 1.0, batch=16, methods=[MethodSpec("sgd", {})])
    for tr in (plain, smooth, sgd):
        tr.run()
    assert not torch.equal(plain.W, smooth.W) and not torch.equal(plain.W, sgd.W)
    assert [m.name for m in sgd.cfg.methods] == ["sgd", "cosine"]       # sgd took the momentum's place
    assert "label_smoothing" in [m.name for m in smooth.cfg.methods] and smooth.pop.path == "autograd"


def test_scale_run_with_a_method_keeps_its_own_cells_and_refuses_what_a_cell_cannot_run(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["scale", "run", "--smoke", "--jobs", "1", "--sizes", "1", "--n-train", "200", "--epochs", "0.5",
            "--out", str(out), "--json"]
    assert main(args) == 0 and main(args + ["+method=label_smoothing"]) == 0
    runs = list_runs(out)
    assert len(runs) == 2 and len({r["config"]["cell"] for r in runs}) == 2
    assert runs[1]["config"]["methods"] == [{"name": "label_smoothing", "options": {"eps": 0.1}}]
    assert "methods" not in runs[0]["config"]
    capsys.readouterr()
    for bad, words in (("+method=swa", "end of a pass"), ("+method=shift", "random stream"),
                       ("+method=batchnorm", "needs model.name=net1989, not convnet"), ("optim.lr=1", "+method=")):
        assert main(args + [bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert len(list_runs(out)) == 2                                        # nothing trained or stored
