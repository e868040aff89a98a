"""Workers that die, on a real PostgreSQL study: 3 worker processes, one SIGKILLed mid-trial;
every grid point completes exactly once (the killed trial retried by another worker, resuming
from the checkpoint the killed one left), the results match a single-process run of the grid."""
import json
import os
import signal
import subprocess
import sys

import optuna
import pytest

from backproplab import store
from backproplab.cli import main
from backproplab.engine.checkpoint import load_checkpoint
from conftest import MID_RUN_PASSES, ROOT, checkpoint_in, kill_a_trial_mid_run
from conftest_postgres import postgres_db, postgres_server  # noqa: F401

GRID = ["search", "smoke", "--smoke", "optim.lr=choice:0.01,0.02,0.05,0.1", "data.n_train=4000",
        f"train.passes={MID_RUN_PASSES}",  # long enough to be caught mid-run (conftest.MID_RUN_PASSES)
        "--sampler", "grid", "--no-retrain", "--json", "--study", "g"]


def _trials(url, name="g"):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_postgres_killed_worker_trial_is_retried_once(tmp_path, postgres_db, capsys):
    out = tmp_path / "w"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "backproplab", *GRID, "--storage", postgres_db, "--jobs", "3",
                             "--heartbeat", "1", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    storage = []

    def trials():
        if not storage:
            storage.append(optuna.storages.RDBStorage(postgres_db, skip_table_creation=True))  # the command creates the schema
        return storage[0].get_all_trials(storage[0].get_study_id_from_name("g"))
    try:
        folder = lambda t: out / "trials" / "g" / f"slot-{t.user_attrs.get('slot', -1):04d}" / "checkpoints"  # noqa
        victim = kill_a_trial_mid_run(proc, trials, lambda t: checkpoint_in(folder(t)) is not None)
        done_at_kill = load_checkpoint(checkpoint_in(folder(victim)))["passes_done"] if victim else None
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, f"no trial was caught mid-run (exit {proc.returncode}; stderr: {stderr[-1500:]!r}; stdout: {stdout[-1500:]!r})"
    assert proc.returncode == 0, stderr
    res = json.loads(stdout.strip().splitlines()[-1])
    assert sorted(res["worker_exit_codes"]) == [-signal.SIGKILL, 0, 0]

    trials = _trials(postgres_db)
    states = [(t.user_attrs["slot"], t.state.name) for t in trials if not t.user_attrs.get("surplus")]
    done = sorted(s for s, st in states if st == "COMPLETE")
    assert done == [0, 1, 2, 3]  # every grid point completed exactly once
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [victim.number]  # the killed attempt, marked stale, nothing else
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == victim.params and retry[0].user_attrs["resumed_from_pass"] == done_at_kill >= 1
    assert retry[0].user_attrs["pid"] != victim.user_attrs["pid"]
    recs = [r for r in store.list_runs(out) if r["kind"] == "search"]
    assert sorted(r["summary"]["slot"] for r in recs) == [0, 1, 2, 3]  # one run a grid point in the store

    # the same grid in one process (journal storage) gives the same values and the same best
    assert main([*GRID, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_slot = {t["slot"]: t["value"] for t in res["trials"]}
    assert {t["slot"]: t["value"] for t in ref["trials"]} == pytest.approx(by_slot)
    assert res["best"]["value"] == ref["best"]["value"] and res["best"]["params"] == ref["best"]["params"]


def test_postgres_worker_joins_a_study_from_its_url(tmp_path, postgres_db, capsys):
    # the first command makes the study and runs it with no workers' help; a second worker command
    # on the same URL finds nothing left to run, a third with an unknown study name is refused
    base = ["search", "smoke", "--smoke", "optim.lr=log:0.01:0.1", "--trials", "2", "--jobs", "1", "--no-retrain",
            "--storage", postgres_db, "--study", "j", "--store", postgres_db, "--json"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["search", "worker", "--storage", postgres_db, "--study", "j", "--out", str(tmp_path / "b"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["complete"] == 2 and res["waiting"] == 0 and res["running"] == 0
    runs = store.list_runs(postgres_db)  # the trials' runs went to the shared store
    assert sorted(r["summary"]["slot"] for r in runs if r["kind"] == "search") == [0, 1]
    assert main(["search", "worker", "--storage", postgres_db, "--study", "nope", "--out", str(tmp_path / "c")]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
