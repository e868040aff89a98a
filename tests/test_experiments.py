import numpy as np
import pytest

from backproplab.config import preset
from backproplab.errors import UserError
from backproplab.experiments.costs import cost_1989_days, training_flops
from backproplab.experiments.datascale import parse_sizes, run_datascale
from backproplab.experiments.ladder import RUNGS, parse_rungs, rung_config
from backproplab.experiments.ladder_report import run_and_report
from backproplab.store import list_runs
from conftest import run_cli
from test_cli import _assert_one_line_error, _idx_folder

ENGINE = "fast"


def test_1989_cost_of_the_paper_is_three_days():
    cfg = preset("rung1")
    assert cost_1989_days(cfg, 7291) == pytest.approx(3.0)  # 23 x 7291 = 167,693 presentations
    assert training_flops(cfg, 7291) == pytest.approx(167_693 * 6 * 63_660)


def test_rungs_are_cumulative():
    c = {r: preset(RUNGS[r][0]) for r in ("1", "2", "3", "4", "5")}
    assert (c["1"].optim.name, c["1"].train.loss, c["1"].model.out_act, c["1"].train.passes) == ("sgd", "mse", "tanh", 23)
    assert (c["2"].train.loss, c["2"].model.out_act, c["2"].optim.lr) == ("ce", "none", 0.01)
    assert (c["3"].optim.name, c["3"].optim.lr, c["3"].optim.lr_end, c["3"].train.passes) == ("adamw", 3e-4, 1e-4, 46)
    assert (c["4"].train.shift, c["4"].train.passes, c["4"].optim.name) == (1, 60, "adamw")
    assert (c["5"].model.dropout, c["5"].model.act, c["5"].train.passes, c["5"].train.shift) == (0.25, "relu", 80, 1)
    b = preset("rung1b")
    assert (b.optim.name, b.model.act, b.train.loss, b.train.passes) == ("sdlm", "scaled_tanh", "mse", 23)


def test_rung7_is_rung5_in_minibatches_plus_what_validation_chose():
    """Rung 7 = the modern preset (rung 5's recipe in minibatches of 32 at its validated rate) plus
    tta and ema, each with its registered defaults, and nothing else (tune_rung7.json's choice)."""
    import json
    from pathlib import Path
    from backproplab.config import validate
    r7, m = validate(preset(RUNGS["7"][0])), validate(preset("modern"))
    assert sorted(s.name for s in r7.methods) == ["ema", "tta"]
    r7.methods, r7.name = [], m.name
    assert r7.to_dict() == m.to_dict()
    tuned = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/tune_rung7.json").read_text())
    assert sorted(c for c in tuned["chosen"] if c.startswith("+method=")) == ["+method=ema", "+method=tta"]
    assert tuned["val"] == 1000 and "test" not in json.dumps(tuned["rows"])  # chosen on validation alone
    assert parse_rungs("5,7") == ["5", "7"] and rung_config("7", 2, smoke=True).train.passes == 2


def test_parse_rungs():
    assert parse_rungs(None) == ["1", "2", "3", "4", "5"]
    assert parse_rungs("1,1b,5") == ["1", "1b", "5"]
    with pytest.raises(UserError, match="unknown rung 9"):
        parse_rungs("1,9")


def test_ladder_smoke_and_resume(tmp_path):
    logs = []
    s1 = run_and_report(["1", "2"], 2, tmp_path, False, 1, True, "mnist10k", log=logs.append, engine=ENGINE)
    rows = {r["rung"]: r for r in s1["rungs"]}
    assert set(rows) == {"1", "2"} and all(r["seeds"] == 2 and r["status"] == "finished" for r in rows.values())
    assert all(p.endswith(".png") for p in s1["plots"]) and len(s1["plots"]) == 3
    assert len([r for r in list_runs(tmp_path) if r["kind"] == "ladder"]) == 2
    s2 = run_and_report(["1", "2"], 2, tmp_path, True, 1, True, "mnist10k", log=logs.append, engine=ENGINE)
    assert [r["weights_sha256"] for r in s2["rungs"]] == [r["weights_sha256"] for r in s1["rungs"]]
    assert [r["seconds"] for r in s2["rungs"]] == [r["seconds"] for r in s1["rungs"]]  # nothing re-trained
    assert len([r for r in list_runs(tmp_path) if r["kind"] == "ladder"]) == 2     # nor recorded twice


def test_datascale_sizes():
    assert parse_sizes(None, 10_000) == [1000, 2000, 4000, 7291]
    assert parse_sizes(None, 60_000) == [1000, 2000, 4000, 7291, 15000, 30000, 50000]
    assert parse_sizes("300,100", 500) == [100, 300]
    with pytest.raises(UserError, match="larger than the 500"):
        parse_sizes("100,600", 500)
    with pytest.raises(UserError, match="integers"):
        parse_sizes("1k", 500)


def test_datascale_on_idx_folder(tmp_path):
    folder = _idx_folder(tmp_path / "idx")
    cfgs, results, rows = run_datascale(str(folder), "10,30", ("1989", "modern"), seeds=2, passes=2,
                                        out=tmp_path / "out", jobs=1, log=lambda s: None, engine=ENGINE)
    assert [(r["recipe"], r["n_train"]) for r in rows] == [("1989", 10), ("1989", 30), ("modern", 10), ("modern", 30)]
    assert all(len(res.history) == 1 for res in results.values())  # evaluated once, at the end
    assert all(res.n_train == k[1] for k, res in results.items())


def test_experiment_cli_errors(tmp_path):
    _assert_one_line_error(run_cli("ladder", "--rungs", "1,9"), "unknown rung 9")
    _assert_one_line_error(run_cli("datascale", "--data", tmp_path), "no train-images")
    _assert_one_line_error(run_cli("datascale", "--sizes", "99999"), "larger than the 7291")
