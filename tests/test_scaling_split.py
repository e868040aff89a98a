"""The scaling study's data discipline and its seeds: validation carved from the training set
(disjoint from the test set and from every cell's training subset), the learning rate never
chosen on test data, the test figures of the chosen rate in each record, S seeds trained in one
population with replica k equal to a cell of seed k alone, bad input refused in one line."""
import json

import numpy as np
import pytest
import torch

from backproplab.cli import main
from backproplab.data import load_dataset
from backproplab.data.sources import canonical_split
from backproplab.scaling import cells as cells_mod
from backproplab.scaling.cells import data_fingerprint, run_cell, seed_subsets, study_data
from backproplab.scaling.families import member
from backproplab.scaling.runs import load_runs_from_store
from backproplab.scaling.study import make_study, run_study
from backproplab.scaling.trainer import CellTrainer
from backproplab.store import list_runs


def test_validation_is_the_data_val_carve_out_and_the_test_set_is_whole(digits):
    tx, ty, vx, vy, sx, sy = study_data("mnist10k", 1000)
    ref = load_dataset().with_validation(1000)                # what data.val=1000 trains and validates on
    assert torch.equal(vx, ref.val_x) and torch.equal(vy, ref.val_labels)
    assert torch.equal(tx, ref.train_x) and len(ty) == 6291
    assert torch.equal(vx, digits.train_x[-1000:]) and torch.equal(sx, digits.test_x) and len(sy) == 2007
    tr, te = canonical_split()                                # the examples, by their index in the 10k pool
    val_ids, test_ids = set(tr[-1000:]), set(te)
    assert not val_ids & test_ids
    for n in (1573, 3146, 6291):
        for idx in seed_subsets(len(ty), [0, 1, 2], n):
            ids = set(tr[:6291][idx])
            assert len(ids) == n and not ids & val_ids and not ids & test_ids
    small = seed_subsets(len(ty), [4], 100)[0]                 # nested: the first n of one order
    assert np.array_equal(seed_subsets(len(ty), [4], 300)[0][:100], small)


def _tagged_data():
    """A training pool, validation and test set whose images carry their own id in pixel (0, 0):
    pool ids 0.., validation ids 1000.., test ids 2000.."""
    g = torch.Generator().manual_seed(3)

    def part(n, base):
        x = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
        x[:, 0, 0, 0] = torch.arange(base, base + n, dtype=torch.float32)
        return x, torch.randint(0, 10, (n,), generator=g)
    return (*part(240, 0), *part(60, 1000), *part(50, 2000))


def _small_study(data, seeds=(0, 1), **kw):
    args = dict(smoke=True, sizes="1", n_train="120,240", epochs="0.5,1", lrs="0.02,0.05,0.12",
                n_avail=len(data[1]), n_val=len(data[3]), seeds=seeds, data_fingerprint=data_fingerprint(data))
    args.update(kw)
    return make_study("convnet", **args)


def test_cells_train_only_on_the_pool_and_evaluate_validation_then_test(tmp_path, monkeypatch):
    data = _tagged_data()
    seen = {"train": set(), "eval": []}

    class Recording(CellTrainer):
        def run(self, stop_after=None):
            self.on_batch = lambda step, idx: None
            for xk in self.xs:
                seen["train"].update(xk[:, 0, 0, 0].round().long().tolist())
            return super().run(stop_after)

        def evaluate(self, x, labels):
            seen["eval"].append(int(x[0, 0, 0, 0].round()))
            return super().evaluate(x, labels)

    monkeypatch.setattr(cells_mod, "CellTrainer", Recording)
    st = _small_study(data)
    run_study(st, tmp_path, jobs=1, data=data, log=lambda line: None)
    assert seen["train"] and max(seen["train"]) < 240        # every training image is a pool image
    # per population (the sweep on seed 0, then seed 1 at the chosen rate): validation first (the
    # choice), then the test set (the report)
    assert seen["eval"] == [1000, 2000] * 2 * len(st.cells)


def test_changing_test_labels_changes_no_chosen_rate(tmp_path):
    data = _tagged_data()
    flipped = data[:5] + ((data[5] + 1 + torch.arange(len(data[5])) % 9) % 10,)   # every test label wrong
    assert (flipped[5] != data[5]).all()
    recs = []
    for name, d in (("a", data), ("b", flipped)):
        # the same study (the fingerprint of the unchanged data: same cell keys) on the two test sets
        run_study(_small_study(data), tmp_path / name, jobs=1, data=d, log=lambda line: None)
        recs.append({r["config"]["cell"]: r["summary"] for r in list_runs(tmp_path / name)})
    assert recs[0].keys() == recs[1].keys() and len(recs[0]) == 4
    for key, a in recs[0].items():
        b = recs[1][key]
        assert a["lr"] == b["lr"] and a["loss"] == b["loss"] and a["sweep"] == b["sweep"]
        assert a["test_error_seeds"] != b["test_error_seeds"]    # the test set was read, for the report only


def test_three_seeds_in_a_cell_equal_cells_of_one_seed_each(digits, tmp_path):
    data = tuple(t[:k] for t, k in zip(study_data("mnist10k", 1000), (600, 600, 200, 200, 150, 150)))
    st = _small_study(data, seeds=(0, 1, 2), n_train="300", epochs="0.5", lrs="0.01,0.04,0.16", rate_seeds=None)
    spec = {**st.spec, "env": {}}
    assert "rate_seeds" not in spec                          # every rate on every seed: the older cells' keys
    cell = st.cells[0]
    joint = run_cell(cell, spec, data, tmp_path / "joint")
    s = joint["summary"]
    assert s["seeds"] == [0, 1, 2] and len(s["val_loss_seeds"]) == 3 and len(s["test_error_seeds"]) == 3
    assert all(len(r["val_loss_seeds"]) == 3 for r in s["sweep"])
    assert s["loss"] == pytest.approx(np.mean(s["val_loss_seeds"]))
    assert s["test_loss"] == pytest.approx(np.mean(s["test_loss_seeds"]))
    assert s["test_error"] == pytest.approx(np.mean(s["test_error_seeds"]))
    for k in range(3):
        solo = run_cell(cell, {**spec, "seeds": [k]}, data, tmp_path / f"solo{k}")["summary"]
        for a, b in zip(s["sweep"], solo["sweep"]):
            assert a["lr"] == b["lr"] and a["val_loss_seeds"][k] == b["val_loss_seeds"][0]
        # the test figures are those of the rate chosen on the mean validation loss, seed k's
        tr = CellTrainer(member("convnet", 1), [s["lr"]], data[0][seed_subsets(600, [k], 300)[0]],
                         data[1][seed_subsets(600, [k], 300)[0]], 0.5, seed=k, batch=spec["batch"])
        tr.run()
        ev = tr.evaluate(data[4], data[5])[0]
        # the loss to float rounding: the cell evaluates the three seeds in one batched forward, and
        # on an AVX2 CPU (no AVX-512) oneDNN's kernels for it round a last bit apart from one seed's
        assert s["test_loss_seeds"][k] == pytest.approx(ev["loss"], rel=1e-6) and s["test_error_seeds"][k] == ev["error"]
    # the population itself: replica k L + j is seed k at rate j, bit for bit
    xs = [data[0][i] for i in seed_subsets(600, [0, 1, 2], 300)]
    ys = [data[1][i] for i in seed_subsets(600, [0, 1, 2], 300)]
    big = CellTrainer(member("convnet", 2), [0.01, 0.04], xs, ys, 0.3, seeds=[0, 1, 2], batch=16)
    big.run()
    for k in range(3):
        one = CellTrainer(member("convnet", 2), [0.01, 0.04], xs[k], ys[k], 0.3, seed=k, batch=16)
        one.run()
        for j in range(2):
            assert torch.equal(big.W[big.replica(k, j)], one.W[j])
    assert not torch.equal(big.W[big.replica(0, 0)], big.W[big.replica(1, 0)])


def _cell_data():
    return tuple(t[:k] for t, k in zip(study_data("mnist10k", 1000), (600, 600, 200, 200, 150, 150)))


def test_rates_swept_on_seed_0_then_the_other_seeds_at_the_chosen_rate(digits, tmp_path):
    data = _cell_data()
    kw = dict(seeds=(0, 1, 2), n_train="300", epochs="0.5", lrs="0.01,0.04,0.16")
    part, full = _small_study(data, **kw), _small_study(data, **kw, rate_seeds=None)
    assert part.spec["rate_seeds"] == 1 and part.spec["digest"] != full.spec["digest"]
    seen = []
    rec = run_cell(part.cells[0], {**part.spec, "env": {}}, data, tmp_path / "part",
                   hooks={"on_batch": lambda step, idx: seen.append(np.shape(idx))})
    ref = run_cell(full.cells[0], {**full.spec, "env": {}}, data, tmp_path / "full")["summary"]
    s = rec["summary"]
    assert s["sweep_seeds"] == [0] and "seed(s) 1, 2 trained at the chosen rate only" in s["lr_chosen_on"]
    assert all(len(r["val_loss_seeds"]) == 1 for r in s["sweep"]) and len(s["sweep"]) == 3
    # the rate is seed 0's best; seed 0's sweep figures are the full sweep's seed 0, bit for bit
    assert s["lr"] == min(s["sweep"], key=lambda r: r["val_loss"])["lr"]
    for a, b in zip(s["sweep"], ref["sweep"]):
        assert a["lr"] == b["lr"] and a["val_loss_seeds"][0] == b["val_loss_seeds"][0]
    # seeds 1 and 2 at that rate: the full sweep's replicas of them at that rate
    j = [r["lr"] for r in ref["sweep"]].index(s["lr"])
    assert s["val_loss_seeds"] == pytest.approx(ref["sweep"][j]["val_loss_seeds"], rel=1e-6, abs=0)
    assert s["loss"] == pytest.approx(np.mean(s["val_loss_seeds"])) and len(s["test_error_seeds"]) == 3
    assert s["test_error"] == pytest.approx(np.mean(s["test_error_seeds"]))
    # two populations: 3 rates x seed 0 (one batch per step), then 1 rate x seeds 1, 2 (a batch each)
    assert s["populations"] == 2 and {len(x) for x in seen} == {1, 2}
    # the store reader: the chosen rate with its 3 seeds, the other rates with seed 0's loss alone;
    # each cell keeps its chosen rate (its mean is over other seeds than the sweep's)
    runs = load_runs_from_store(tmp_path / "part" / "runs.db", min_runs=1)
    assert sorted(runs.info["seeds"].items()) == [(1, 2), (3, 1)]
    from backproplab.scaling.runs import best_per_cell
    best = best_per_cell(runs)
    assert len(best) == 1 and best.lr[0] == s["lr"] and best.loss[0] == pytest.approx(s["loss"])
    one = load_runs_from_store(tmp_path / "part" / "runs.db", min_runs=1, seed_weights=[0, 1, 0])
    assert len(one) == 1 and one.loss[0] == pytest.approx(s["val_loss_seeds"][1])


def test_a_cell_stopped_in_its_chosen_rate_population_resumes_to_the_same_record(digits, tmp_path):
    data = _cell_data()
    st = _small_study(data, seeds=(0, 1, 2), n_train="300", epochs="1", lrs="0.01,0.04")
    spec = {**st.spec, "env": {}, "ckpt_steps": 3}
    ref = run_cell(st.cells[0], spec, data, tmp_path / "ref")["summary"]
    calls = []

    def stop(step, idx):
        calls.append(np.shape(idx))
        if len(np.shape(idx)) == 2 and step == 5:            # the second population, after its step-3 checkpoint
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_cell(st.cells[0], spec, data, tmp_path / "cut", hooks={"on_batch": stop})
    sweep = json.loads(next((tmp_path / "cut" / "scale_ckpt").glob("*.sweep.json")).read_text())
    assert len(sweep["populations"]) == 1 and list((tmp_path / "cut" / "scale_ckpt").glob("*.ckpt"))
    again = run_cell(st.cells[0], spec, data, tmp_path / "cut")["summary"]
    assert again["resumed"] and not ref["resumed"]
    for k in ("lr", "val_loss_seeds", "test_loss_seeds", "sweep"):
        assert again[k] == ref[k], k
    assert len(list_runs(tmp_path / "cut")) == 1 and not list((tmp_path / "cut" / "scale_ckpt").glob("*"))


def test_the_store_reads_a_cells_seeds_as_its_mean_with_spread(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["scale", "run", "--smoke", "--jobs", "1", "--sizes", "1,2,3", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    runs = load_runs_from_store(out / "runs.db")
    # the chosen rate of each cell with its 3 seeds, the other rate with seed 0's loss alone
    assert runs.info["seeds"] == {3: 12, 1: 12} and len(runs.info["seed_spread"]) == 12
    rec = list_runs(out)[0]
    assert rec["config"]["seeds"] == [0, 1, 2] and rec["config"]["n_val"] == 300
    assert "val=last n_val training examples" in rec["config"]["split"]
    s = rec["summary"]
    assert s["test_error"] is not None and s["test_error"] == pytest.approx(np.mean(s["test_error_seeds"]))
    assert main(["scale", "fit", str(out / "runs.db"), "--n-boot", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["seeds_per_run"] == {"3": 12, "1": 12} and rep["seed_spread"]["n_cells"] == 12


def _error(capsys, *argv):
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_validation_training_sizes_and_seeds_are_refused(tmp_path, capsys):
    out = tmp_path / "o"
    assert "--n-val 7291 must leave training examples" in _error(capsys, "scale", "run", "--n-val", "7291",
                                                                 "--out", out)
    err = _error(capsys, "scale", "run", "--n-train", "7291", "--out", out)
    assert "larger than the 6291 training examples" in err and "validation carve-out" in err
    assert "larger than the 291" in _error(capsys, "scale", "run", "--n-val", "7000", "--n-train", "300",
                                           "--out", out)
    assert "distinct seeds" in _error(capsys, "scale", "run", "--seeds", "0,0", "--out", out)
    assert "comma-separated integers" in _error(capsys, "scale", "run", "--seeds", "a", "--out", out)
    assert "not both" in _error(capsys, "scale", "run", "--seeds", "0,1", "--seed", "2", "--out", out)
    assert "--rate-seeds 0" in _error(capsys, "scale", "run", "--rate-seeds", "0", "--out", out)
    assert "--n-val must be >= 1" in _error(capsys, "scale", "run", "--n-val", "0", "--out", out)
    assert not (out / "runs.db").exists()


def test_fit_refuses_a_store_mixing_test_validated_and_carve_out_cells(tmp_path):
    from backproplab.errors import UserError
    from backproplab.scaling.study import SPLIT
    from backproplab.store import add_run

    def summary(size, n):
        m = member("convnet", size)
        return {"N": m.params, "D": n, "C": m.train_flops * n, "loss": 1.0 / size + 1000.0 / n, "lr": 0.03,
                "epochs": 1.0, "n_train": n}
    old = {"n_val": None, "seed": 0}                               # a record written before the carve-out
    new = {"n_val": 1000, "split": SPLIT, "seeds": [0, 1, 2]}
    for size in (1, 2, 3):
        for n in (500, 1000, 2000, 4000):
            add_run(tmp_path, "scale", f"o{size}-{n}", "finished", old, summary(size, n), [], {})
    assert "test split" in load_runs_from_store(tmp_path).info["validation"]
    add_run(tmp_path, "scale", "n1", "finished", new, summary(1, 1573), [], {})
    with pytest.raises(UserError, match="mixes scale records validated on different data"):
        load_runs_from_store(tmp_path)
