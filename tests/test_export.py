"""Out of the store: `runs --csv` / `--json` (every run, one row each) and `export tensorboard`,
read back with TensorBoard's own event reader and compared with the store."""
import csv
import io
import json
import sys

import pytest

from backproplab.cli import main
from backproplab.store import add_run, list_runs


def _history(n_rep, passes, with_val):
    hist, total = [], 0.0
    for p in range(1, passes + 1):
        total += 0.5 + 0.1 * p
        rec = {"pass": p, "seconds": 0.5 + 0.1 * p, "seconds_total": total}
        for sp in ("train", "val", "test") if with_val else ("train", "test"):
            rec[sp] = [{"loss": 1.0 / (p + r + 1) + (sp == "test") * 0.01, "error": 50.0 / (p + r),
                        "misses": 7 * p + r} for r in range(n_rep)]
        hist.append(rec)
    return hist


@pytest.fixture
def store(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    add_run(out, "repro", "lecun1989", "finished", {"train": {"seed": 3}},
            {"seeds": 2, "passes": 3, "test_error": 5.1, "engine": "fast", "weights_sha256": ["a", "b"],
             "per_seed": [{"seed": 3}, {"seed": 4}]}, _history(2, 3, False), {})
    add_run(out, "train", "modern smoke/x", "finished", {"train": {"seed": 0}},
            {"seeds": 1, "passes": 2, "test_error": 2.25, "val_error": 2.5, "methods": ["sam"]},
            _history(1, 2, True), {})
    add_run(out, "scale", "cell", "finished", {}, {"N": 1000, "loss": 0.3, "sweep": [{"lr": 0.1}]}, [], {})
    return out


def test_runs_csv_has_one_row_per_run_with_the_summary_fields(store, capsys, tmp_path):
    assert main(["runs", "--csv", "--out", str(store)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    runs = list_runs(store)
    assert [int(r["id"]) for r in rows] == [r["id"] for r in runs]
    for row, run in zip(rows, runs):
        assert (row["kind"], row["name"], row["status"]) == (run["kind"], run["name"], run["status"])
        for k, v in run["summary"].items():
            if isinstance(v, (int, float)):
                assert float(row[k]) == v
            elif isinstance(v, str):
                assert row[k] == v
            else:
                assert k not in row        # nested fields are in --json
    assert rows[0]["val_error"] == "" and rows[1]["val_error"] == "2.5"
    assert main(["runs", "--csv", str(tmp_path / "runs.csv"), "--json", "--out", str(store)]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert [r["summary"] for r in listed] == [r["summary"] for r in runs]
    assert (tmp_path / "runs.csv").read_text().count("\n") == 4


def test_export_tensorboard_matches_the_store(store, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    dest = tmp_path / "tb"
    for _ in range(2):  # exporting twice replaces the event files
        assert main(["export", "tensorboard", str(dest), "--out", str(store), "--json"]) == 0
        rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["skipped_without_history"] == [3] and [r["id"] for r in rep["runs"]] == [1, 2]
    seen = 0
    for run in list_runs(store)[:2]:
        seeds = [p["seed"] for p in run["summary"].get("per_seed", [])] or [0]
        folders = sorted(p.name for p in next(dest.glob(f"run{run['id']:04d}-*")).iterdir())
        assert folders == sorted(f"seed{s}" for s in seeds)
        for r, seed in enumerate(seeds):
            logdir = next(dest.glob(f"run{run['id']:04d}-*")) / f"seed{seed}"
            assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
            acc = EventAccumulator(str(logdir))
            acc.Reload()
            tags = acc.Tags()["scalars"]
            splits = [sp for sp in ("train", "val", "test") if sp in run["history"][0]]
            assert sorted(tags) == sorted([f"{sp}/{m}" for sp in splits for m in ("loss", "error", "misses")]
                                          + ["time/pass_seconds"])
            for sp in splits:
                for m in ("loss", "error", "misses"):
                    ev = acc.Scalars(f"{sp}/{m}")
                    assert [e.step for e in ev] == [h["pass"] for h in run["history"]]
                    assert [e.value for e in ev] == pytest.approx([h[sp][r][m] for h in run["history"]], rel=1e-6)
                    seen += len(ev)
            t = acc.Scalars("time/pass_seconds")
            assert [e.value for e in t] == pytest.approx([h["seconds"] for h in run["history"]], rel=1e-6)
            assert t[-1].wall_time == pytest.approx(run["created"], abs=1e-3)
    assert seen == 2 * 3 * 2 * 3 + 1 * 3 * 3 * 2


def test_export_errors_are_one_line(store, tmp_path, capsys, monkeypatch):
    assert main(["export", "tensorboard", str(tmp_path / "tb"), "--out", str(store), "--runs", "9"]) == 2
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["export", "tensorboard", str(blocker / "tb"), "--out", str(store)]) == 2
    for name in ("tensorboard", "tensorboard.compat.proto", "tensorboard.summary.writer.event_file_writer"):
        monkeypatch.setitem(sys.modules, name, None)  # the optional extra not installed
    assert main(["export", "tensorboard", str(tmp_path / "tb"), "--out", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "no run 9" in err[0] and "cannot write into" in err[1]
    assert "pip install -e '.[tensorboard]'" in err[2]
    assert not (tmp_path / "tb").exists()
