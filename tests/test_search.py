"""`backproplab search`: the smoke search with journal storage and 2 workers end to end, the
objective against an independent training run, pruning, and bad input refused before any trial."""
import json

import pytest

from backproplab import store
from backproplab.cli import main
from conftest import run_cli


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_search_smoke_journal_two_workers(tmp_path):
    out = tmp_path / "o"
    r = run_cli("search", "--smoke", "--out", out, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    res = _last_json(r.stdout)
    assert res["workers"] == 2 and res["worker_exit_codes"] == [0, 0]
    assert (out / "search.journal").is_file() and res["storage"].startswith("journal")
    slots = sorted(t["slot"] for t in res["trials"])
    assert slots == [0, 1, 2, 3] and res["complete"] == 4 and res["attempts"] == 4
    runs = store.list_runs(out)
    trials = [x for x in runs if x["kind"] == "search"]
    assert sorted(x["summary"]["slot"] for x in trials) == slots
    assert all(x["summary"]["study"] == res["study"] and x["config"]["data"]["val"] == 100 for x in trials)
    # the search never records (so never looks at) a trial's test figures
    assert not [k for x in trials for k in x["summary"] if k.startswith("test")]
    assert not [h for x in trials for h in x["history"] if "test" in h]
    by_trial = {x["summary"]["trial"]: x for x in trials}
    for t in res["trials"]:  # the objective is the last pass's validation error of the stored run
        assert t["value"] == pytest.approx(by_trial[t["trial"]]["summary"]["val_error"])
        assert t["value"] == pytest.approx(by_trial[t["trial"]]["history"][-1]["val"][0]["error"])
    best = min(res["trials"], key=lambda t: t["value"])
    assert res["best"]["trial"] == best["trial"]
    final = [x for x in runs if x["kind"] == "search-best"]
    assert len(final) == 1 and final[0]["summary"]["seeds"] == 2
    assert "val" not in final[0]["config"]["data"] and final[0]["config"]["optim"]["lr"] == best["params"]["optim.lr"]
    assert res["final"]["test_error"] == pytest.approx(final[0]["summary"]["test_error"])

    # oracle: the same trial config trained here, outside any study, has the same validation error
    from backproplab.config import from_dict
    from backproplab.engine.train import train
    again = train(from_dict(by_trial[best["trial"]]["config"]))
    assert sum(f["val_error"] for f in again.final) / len(again.final) == pytest.approx(best["value"])


def test_search_asha_prunes_on_validation_error(tmp_path, capsys):
    common = ["search", "smoke", "--smoke", "optim.lr=log:1e-5:0.3", "train.passes=3", "--trials", "6",
              "--jobs", "1", "--no-retrain", "--json"]
    assert main(common + ["--pruner", "asha", "--out", str(tmp_path / "a")]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["pruned"] >= 1 and res["complete"] + res["pruned"] == 6
    runs = {x["summary"]["slot"]: x for x in store.list_runs(tmp_path / "a") if x["kind"] == "search"}
    for t in res["trials"]:
        rec = runs[t["slot"]]
        if t["state"] == "pruned":  # stopped early: fewer passes trained, recorded as pruned
            assert rec["status"] == "pruned" and t["passes"] < 3 and len(rec["history"]) == t["passes"]
        else:
            assert rec["status"] == "finished" and t["passes"] == 3
    assert res["passes_trained"] < 6 * 3
    # the same trials without a pruner: nothing is pruned, and the first trial (sampled before any
    # pruning could differ) has the same value
    assert main(common + ["--pruner", "none", "--out", str(tmp_path / "n")]) == 0
    res_n = _last_json(capsys.readouterr().out)
    assert res_n["pruned"] == 0 and res_n["complete"] == 6 and res_n["passes_trained"] == 18
    assert res_n["trials"][0]["params"] == res["trials"][0]["params"]
    # the first rung moved to pass 2: a pruned trial has trained exactly 2 passes (the next rung, 2 x 3, is past the end)
    assert main(common + ["--pruner", "asha:min=2,factor=3", "--out", str(tmp_path / "m")]) == 0
    res_m = _last_json(capsys.readouterr().out)
    assert res_m["pruned"] >= 1 and {t["passes"] for t in res_m["trials"] if t["state"] == "pruned"} == {2}


BAD = [
    (["optim.lrr=1e-3:1e-2"], "unknown config key"),
    (["optim.lr=0.1:0.01"], "empty range"),
    (["optim.lr=log:0:0.1"], "LOW > 0"),
    (["train.batch=int:8:8"], "empty range"),
    (["+method=nosuch:eps=0:0.3"], "unknown method"),
    (["methods=choice:ema,nosuch"], "unknown method"),
    (["+method=label_smoothing:epsilon=0:0.3"], "has no option"),
    (["+method=label_smoothing:eps=0:3"], "eps"),
    (["model.act=choice:"], "empty choice"),
    (["data.val=10:20"], "cannot be searched"),
    (["model.name=choice:net1989,vit"], "needs train.engine=population"),  # smoke is per example
    (["--sampler", "bayes", "optim.lr=0.01:0.1"], "--sampler"),
    (["--sampler", "tpe:warmup=3", "optim.lr=0.01:0.1"], "'warmup=3' is not an option of tpe"),
    (["--sampler", "tpe:startup=0", "optim.lr=0.01:0.1"], "startup must be >= 1"),
    (["--sampler", "tpe:multivariate=2", "optim.lr=0.01:0.1"], "multivariate 0 or 1"),
    (["--sampler", "random:startup=3", "optim.lr=0.01:0.1"], "not an option of random"),
    (["--sampler", "tpe:startup=x", "optim.lr=0.01:0.1"], "is not an integer"),
    (["--pruner", "median", "optim.lr=0.01:0.1"], "choose one of none, asha, hyperband"),
    (["--pruner", "asha:min=0", "optim.lr=0.01:0.1"], "min must be >= 1"),
    (["--pruner", "asha:rungs=2", "optim.lr=0.01:0.1"], "'rungs=2' is not an option of asha"),
    (["--pruner", "asha:factor=x", "optim.lr=0.01:0.1"], "is not an integer"),
    (["--pruner", "hyperband:min=99", "optim.lr=0.01:0.1"], "more than a trial's"),
]


@pytest.mark.parametrize("items,msg", BAD)
def test_search_bad_space_is_one_line_before_any_trial(tmp_path, capsys, items, msg):
    out = tmp_path / "never"
    assert main(["search", "smoke", "--smoke", "--out", str(out), *items]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and msg in err, err
    assert not out.exists()  # nothing ran, nothing was created


def test_search_unreachable_storage_names_the_host_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    store.add_run(out, "repro", "x", "finished", {}, {}, [], {})
    before = sorted(p.name for p in out.iterdir()), (out / "runs.db").read_bytes()
    url = "postgresql+psycopg://someone:hunter2@127.0.0.1:9/nowhere"
    assert main(["search", "smoke", "--smoke", "optim.lr=0.01:0.1", "--storage", url, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach study storage at 127.0.0.1:9") and "\n" not in err
    assert "hunter2" not in err
    assert (sorted(p.name for p in out.iterdir()), (out / "runs.db").read_bytes()) == before


def test_search_study_name_with_another_space_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    first = ["search", "smoke", "--smoke", "--trials", "1", "--jobs", "1", "--no-retrain", "--study", "s1",
             "--out", out]
    assert main(first + ["optim.lr=log:0.01:0.1"]) == 0
    capsys.readouterr()
    assert main(first + ["optim.lr=log:0.02:0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "study 's1'" in err and "another search space" in err and "\n" not in err
    # the same space continues the study: its one slot is done, nothing new runs
    assert main(first + ["optim.lr=log:0.01:0.1", "--json"]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["attempts"] == 1 and res["complete"] == 1


def test_search_journal_dead_local_worker_trial_is_retried(tmp_path):
    """A journal has no heartbeat: the process that started the workers retries the trial of one
    it saw die (SIGKILL mid-trial), from the checkpoint the dead one left; every slot once."""
    import os
    import signal
    import subprocess
    import sys

    import optuna
    from optuna.storages.journal import JournalFileBackend

    from backproplab.engine.checkpoint import load_checkpoint
    from conftest import MID_RUN_PASSES, ROOT, checkpoint_in, kill_a_trial_mid_run
    out = tmp_path / "o"
    cmd = ["search", "smoke", "--smoke", "optim.lr=choice:0.01,0.03,0.1", "data.n_train=4000",
           f"train.passes={MID_RUN_PASSES}", "--sampler", "grid", "--no-retrain", "--json", "--study", "k",
           "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "backproplab", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))

    def trials():
        backend = optuna.storages.JournalStorage(JournalFileBackend(str(out / "search.journal")))
        return backend.get_all_trials(backend.get_study_id_from_name("k"))
    try:
        folder = lambda t: out / "trials" / "k" / f"slot-{t.user_attrs.get('slot', -1):04d}" / "checkpoints"  # noqa
        victim = kill_a_trial_mid_run(proc, trials, lambda t: checkpoint_in(folder(t)) is not None)
        done_at_kill = load_checkpoint(checkpoint_in(folder(victim)))["passes_done"] if victim else None
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, f"no trial was caught mid-run (exit {proc.returncode}; stderr: {stderr[-1500:]!r}; stdout: {stdout[-1500:]!r})"
    assert proc.returncode == 0, stderr
    res = _last_json(stdout)
    assert -signal.SIGKILL in res["worker_exit_codes"]
    assert sorted(t["slot"] for t in res["trials"] if t["state"] == "complete") == [0, 1, 2]
    retried = [t for t in res["trials"] if t["retried"]]
    assert len(retried) == 1 and retried[0]["slot"] == victim.user_attrs["slot"]
    assert retried[0]["resumed_from_pass"] == done_at_kill >= 1
    assert res["attempts"] == 4 and res["stale_failed"] == 1 and res["running"] == 0
    assert sorted(r["summary"]["slot"] for r in store.list_runs(out) if r["kind"] == "search") == [0, 1, 2]


def test_search_trials_bar_counts_the_study_on_a_terminal(tmp_path):
    """On a terminal run_workers draws a bar of the study's slots, read back from the storage as
    trials finish (3 trials, in process): its last state reads 3/3."""
    import io

    from rich.console import Console

    from backproplab.report import progress as P
    from backproplab.search.study import run_study, storage_spec
    buf = io.StringIO()
    P.configure(console=Console(file=buf, force_terminal=True, width=120))
    seen = []

    def objective(trial):
        seen.append(trial.number)
        return trial.suggest_float("x", 0.0, 1.0)
    try:
        study, codes = run_study("bar", storage_spec(None, tmp_path), objective, n_trials=3, sampler="random")
    finally:
        P.close_all()
        P.configure()
    assert codes == [0] and len(seen) == 3
    assert "search trials 3/3" in buf.getvalue() and "search trials 0/3" in buf.getvalue()


def _kernels_loaded(q):
    from backproplab.engine.warmup import _dispatchers
    q.put([bool(d.signatures) for d in _dispatchers()])


def test_search_workers_start_with_the_fast_kernels_loaded():
    """The fork server loads the kernels from numba's cache once (search/preload.py), so a worker
    forked from it has them in memory before its first trial."""
    from backproplab.engine.kernelgrad import _cpu_reason
    from backproplab.engine.warmup import KERNELS, cache_state, prepare_kernels
    from backproplab.search.study import _context
    if _cpu_reason() is not None:
        pytest.skip(_cpu_reason())
    prepare_kernels(lambda msg: None)   # the cache is warm after this (compiled once if it was not)
    assert not cache_state()[0]
    ctx = _context()
    if ctx.get_start_method() != "forkserver":
        pytest.skip("no fork server on this platform")
    q = ctx.Queue()
    p = ctx.Process(target=_kernels_loaded, args=(q,))
    p.start()
    loaded = q.get(timeout=120)
    p.join(timeout=60)
    assert loaded == [True] * len(KERNELS)


def test_tpe_options_reach_the_sampler():
    """tpe:startup=N,multivariate=0|1 set Optuna's TPESampler; plain tpe is Optuna's default sampler
    (10 start-up trials, multivariate left to Optuna), so existing studies sample as before."""
    from backproplab.search.study import make_sampler, parse_sampler
    assert parse_sampler("tpe") == ("tpe", {"startup": 10, "multivariate": None})
    assert parse_sampler("tpe:startup=4,multivariate=0") == ("tpe", {"startup": 4, "multivariate": 0})
    s = make_sampler("tpe:startup=4,multivariate=1", 3)
    assert s._n_startup_trials == 4 and s._multivariate is True
    assert make_sampler("tpe:multivariate=0", 3)._multivariate is False
    import optuna
    ref, ours = optuna.samplers.TPESampler(seed=3), make_sampler("tpe", 3)
    assert (ours._n_startup_trials, ours._multivariate) == (ref._n_startup_trials, ref._multivariate)
