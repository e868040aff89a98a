"""Grids handed to the search workers on a real PostgreSQL study and results store: the runs of
`effects` and the cells of `scale run`, with worker processes one of which is SIGKILLed
mid-point; every point completes exactly once, is recorded once, and the table read back from
the store equals a single-process run of the same grid. And the bad input around them."""
import json
import os
import subprocess
import sys

import optuna
import pytest

from backproplab import store
from backproplab.cli import main
from backproplab.config import from_dict
from backproplab.engine.train import checkpoint_path
from backproplab.errors import UserError
from conftest import ROOT, kill_a_trial_mid_run
from conftest_postgres import _free_port, postgres_db, postgres_server  # noqa: F401

EFFECTS = ["effects", "--smoke", "--seeds", "2", "--top-pairs", "0", "--passes", "4", "--json"]
SCALE = ["scale", "run", "--smoke", "--sizes", "1,2", "--n-train", "3000", "--epochs", "1", "--json"]
DETERMINISTIC = ("method", "status", "seeds", "test_error", "test_error_std", "diff", "ci_low", "ci_high", "p_value",
                 "passes_to_base", "val_error", "base_error")


def _run_and_kill(cmd, url, study, out, victim_ready, timeout=240):
    """Start the command in a subprocess; SIGKILL the worker of the first RUNNING point for which
    victim_ready(trial) holds -> (returncode, stdout, stderr, the killed trial)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "backproplab", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    storage = []

    def trials():
        if not storage:
            storage.append(optuna.storages.RDBStorage(url, skip_table_creation=True))  # the command creates the schema
        return storage[0].get_all_trials(storage[0].get_study_id_from_name(study))
    try:
        victim = kill_a_trial_mid_run(proc, trials, victim_ready, timeout)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr, victim


def _slots(url, study):
    trials = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    done = sorted(t.user_attrs["slot"] for t in trials if t.state.name == "COMPLETE")
    failed = [t for t in trials if t.state.name == "FAIL"]
    return trials, done, failed


def test_postgres_effects_grid_with_a_killed_worker_runs_each_point_once(tmp_path, postgres_db, capsys):
    out = tmp_path / "w"

    def has_checkpoint(t):  # killed after its first pass: the retry resumes the shared checkpoint
        return checkpoint_path(from_dict(t.user_attrs["point"]["config"]), out).exists()

    code, stdout, stderr, victim = _run_and_kill(
        EFFECTS + ["--storage", postgres_db, "--store", postgres_db, "--study", "fx", "--jobs", "3",
                   "--heartbeat", "0.5", "--out", str(out)], postgres_db, "fx", out, has_checkpoint)
    assert victim is not None, f"no point was caught mid-run (exit {code}; stderr: {stderr[-1500:]!r})"
    assert code == 0, stderr
    grid = json.loads(stdout.strip().splitlines()[-1])
    trials, done, failed = _slots(postgres_db, "fx")
    assert done == ["base", "ema", "label_smoothing"]                 # every point completed exactly once
    assert [t.number for t in failed] == [victim.number]              # the killed attempt, nothing else
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"  # retried by another worker
    assert retry[0].user_attrs["pid"] != victim.user_attrs["pid"]
    runs = store.list_runs(postgres_db)
    assert sorted(r["summary"]["method"] for r in runs if r["kind"] == "effects-run") == \
        ["base", "ema", "label_smoothing"]                            # one record a point, none twice
    assert [r["kind"] for r in runs].count("effects") == 1
    assert not (out / "runs.db").exists()                             # the records went to the shared store

    # the same grid in one process, no workers: the same table and the same weights
    assert main(EFFECTS + ["--out", str(tmp_path / "one")]) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pick = lambda rows: [{k: r.get(k) for k in DETERMINISTIC} for r in rows]  # noqa: E731
    assert pick(grid["rows"]) == pick(ref["rows"])
    sha = lambda runs: {r["summary"]["method"]: r["summary"]["weights_sha256"]  # noqa: E731
                        for r in runs if r["kind"] == "effects-run"}
    assert sha(runs) == sha(store.list_runs(tmp_path / "one"))


def test_postgres_scale_grid_with_a_killed_worker_records_each_cell_once(tmp_path, postgres_db):
    out = tmp_path / "w"
    code, stdout, stderr, victim = _run_and_kill(
        # killed as soon as its cell starts: before the fix in study.SlotObjective (the first heartbeat
        # written before the objective), a worker killed before Optuna's heartbeat thread first wrote
        # left its cell RUNNING for good and this test hung (test_study_stale.py pins that down)
        SCALE + ["--storage", postgres_db, "--store", postgres_db, "--study", "sc", "--jobs", "2", "--heartbeat", "0.5",
                 "--out", str(out)], postgres_db, "sc", out, lambda t: True)
    assert victim is not None, f"no cell was caught mid-run (exit {code}; stderr: {stderr[-1500:]!r})"
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["ran"] == 2 and summary["store"] == postgres_db
    trials, done, failed = _slots(postgres_db, "sc")
    assert len(done) == 2 and len(set(done)) == 2 and [t.number for t in failed] == [victim.number]
    cells = [r for r in store.list_runs(postgres_db) if r["kind"] == "scale"]
    assert sorted(r["config"]["cell"] for r in cells) == done         # one record a cell

    # the same cells in one process into a folder store: the same chosen rates and losses
    assert main(SCALE + ["--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    ref = {r["config"]["cell"]: r["summary"] for r in store.list_runs(tmp_path / "one") if r["kind"] == "scale"}
    for r in cells:
        s = r["summary"]
        assert (s["lr"], s["val_loss_seeds"], s["test_error_seeds"]) == \
            (ref[r["config"]["cell"]]["lr"], ref[r["config"]["cell"]]["val_loss_seeds"],
             ref[r["config"]["cell"]]["test_error_seeds"])

    # a second run of the same grid finds every cell in the shared store and runs none
    assert main(SCALE + ["--storage", postgres_db, "--store", postgres_db, "--study", "sc", "--out",
                         str(tmp_path / "again")]) == 0
    assert len([r for r in store.list_runs(postgres_db) if r["kind"] == "scale"]) == 2


def test_postgres_search_worker_runs_a_grid_study_from_its_url(tmp_path, postgres_db, capsys):
    # the points are enqueued by the command; a worker started elsewhere runs them into the shared store
    from backproplab.experiments.effects import base_config
    from backproplab.search import grid
    from backproplab.search import study as st
    storage = st.storage_spec(postgres_db, tmp_path)
    study = grid.open_grid(storage, "ext", grid.EFFECTS, {"test": 1}, tmp_path, postgres_db)
    cfg = base_config("modern", 1, True, passes=1)
    st.enqueue_points(study, {"base": ({}, {grid.POINT: {"key": "base", "config": cfg.to_dict()}})})
    assert main(["search", "worker", "--storage", postgres_db, "--study", "ext", "--out", str(tmp_path / "b"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kind"] == grid.EFFECTS and res["complete"] == 1 and res["waiting"] == res["running"] == 0
    [run] = [r for r in store.list_runs(postgres_db) if r["kind"] == "effects-run"]
    assert run["summary"]["method"] == "base" and run["summary"]["config_digest"] == cfg.digest()


def _unreachable():
    return f"postgresql+psycopg://postgres:secret@127.0.0.1:{_free_port()}/nothing"


@pytest.mark.parametrize("cmd", [["effects", "--smoke"], ["scale", "run", "--smoke"]])
@pytest.mark.parametrize("flag", ["--storage", "--store"])
def test_postgres_unreachable_server_is_one_line_and_touches_nothing(tmp_path, capsys, cmd, flag):
    url = _unreachable()
    out = tmp_path / "out"
    assert main(cmd + [flag, url, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "127.0.0.1:" in err and "secret" not in err
    assert not out.exists()


def test_postgres_doctor_checks_a_store_url(tmp_path, postgres_db, capsys):
    store.add_run(postgres_db, "repro", "x", "finished", {}, {}, [], {})
    assert main(["doctor", "--out", str(tmp_path / "o"), "--store", postgres_db, "--json"]) == 0
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]}
    assert checks["results store"]["ok"] and "1 run (1 finished)" in checks["results store"]["detail"]
    url = _unreachable()
    assert main(["doctor", "--out", str(tmp_path / "o"), "--store", url, "--json"]) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]}
    detail = checks["results store"]["detail"]
    assert not checks["results store"]["ok"] and "127.0.0.1:" in detail and "secret" not in detail
    assert not (tmp_path / "o").exists()


def test_postgres_grid_study_name_with_another_grid_is_refused(tmp_path, capsys):
    # a journal storage is enough: the refusal comes before anything trains or is written to the store
    from backproplab.search import grid
    from backproplab.search import study as st
    journal = tmp_path / "g.journal"
    grid.open_grid(st.storage_spec(str(journal), tmp_path), "taken", grid.EFFECTS, {"other": 1}, tmp_path, tmp_path)
    assert main(["effects", "--smoke", "--storage", str(journal), "--study", "taken", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exists with another search space" in err and not (tmp_path / "runs.db").exists()
    assert main(["effects", "--smoke", "--storage", str(journal), "--heartbeat", "0", "--out", str(tmp_path)]) == 2
    assert "--heartbeat must be > 0" in capsys.readouterr().err


def test_postgres_scale_point_refuses_other_data_and_skips_a_recorded_cell(tmp_path):
    from backproplab.scaling.study import make_study, run_point
    study = make_study("convnet", smoke=True, sizes="1", n_train="100", epochs="0.5", n_avail=6991, n_val=300)
    cell = study.cells[0]
    with pytest.raises(UserError, match="differs from the study's"):
        run_point(cell, study.spec, "not-this-data", tmp_path, tmp_path)
    assert not (tmp_path / "runs.db").exists()
    # a cell a killed attempt already recorded is read back, not trained again (nor recorded twice)
    store.add_run(tmp_path, "scale", cell["key"], "finished", {"cell": cell["key"]}, {"loss": 1.25}, [], {})
    assert run_point(cell, study.spec, "not-this-data", tmp_path, tmp_path) == 1.25
    assert len(store.list_runs(tmp_path)) == 1


def test_postgres_stored_result_rebuilds_a_one_seed_run(tmp_path):
    # the one-seed branch (summary() flattens the final figures); the two-seed one is the grid tests'
    from backproplab.experiments.effects import base_config, record_run, stored_result
    from backproplab.engine.train import environment, train
    res = train(base_config("modern", 1, True, passes=1), out=tmp_path)
    run_id = record_run(tmp_path, "base", res, environment())
    assert record_run(tmp_path, "base", res, environment()) == run_id   # recorded once
    back = stored_result(next(r for r in store.list_runs(tmp_path) if r["id"] == run_id))
    assert back.final == res.final and back.history == res.history and back.seeds == res.seeds
    assert back.summary() == res.summary()


def test_postgres_scale_fit_reads_a_server_store_as_it_reads_a_folder(tmp_path, postgres_db, capsys):
    from backproplab.scaling.synthetic import synthetic_runs
    runs = synthetic_runs(n_N=4, n_D=4, seed=3, family="convnet")
    (tmp_path / "folder").mkdir()
    for target in (tmp_path / "folder", postgres_db):
        for i, rec in enumerate(runs.records()):
            store.add_run(target, "scale", f"r{i}", "finished", {"family": rec.pop("family")}, rec, [], {})
    fits = []
    for target, out in ((tmp_path / "folder", tmp_path / "fa"), (postgres_db, tmp_path / "fb")):
        assert main(["scale", "fit", str(target), "--n-boot", "0", "--out", str(out), "--json"]) == 0
        fits.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert (out / "scaling_report.json").is_file()
    a, b = (f["families"]["convnet"]["chinchilla"]["constants"] for f in fits)
    assert a == b and a["alpha"] > 0                                 # the same fit from either store
    assert [r["kind"] for r in store.list_runs(postgres_db)].count("scale_fit") == 1  # recorded in the server store
    assert fits[1]["store_record"] == max(r["id"] for r in store.list_runs(postgres_db))


def test_postgres_scale_fit_of_an_unreachable_server_is_one_line(capsys):
    assert main(["scale", "fit", _unreachable()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "127.0.0.1" in err and "secret" not in err and "\n" not in err


def test_postgres_effects_point_read_back_only_from_the_store_its_worker_wrote(tmp_path):
    # a journal study of one point run into store a; read through store b, whose run 1 is another
    # run, it is one error naming the point, never that run's numbers
    from backproplab.experiments.effects import base_config
    from backproplab.search import grid
    from backproplab.search import study as st
    storage = st.storage_spec(str(tmp_path / "g.journal"), tmp_path)
    cfgs = {"base": base_config("modern", 1, True, passes=1)}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = grid.EffectsRunner(storage, "one", {"t": 1}, 1, tmp_path / "w", tmp_path / "a", log=lambda s: None)
    got = a(cfgs, "runs")
    assert got["base"].final[0]["test_error"] == store.list_runs(tmp_path / "a")[0]["summary"]["test_error"]
    store.add_run(tmp_path / "b", "effects-run", "other", "finished", {}, {"config_digest": "x"}, [], {})
    b = grid.EffectsRunner(storage, "one", {"t": 1}, 1, tmp_path / "w", tmp_path / "b", log=lambda s: None)
    with pytest.raises(UserError, match="grid point base: its run 1 is not in the results store"):
        b(cfgs, "runs")
