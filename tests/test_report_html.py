"""`backproplab report`: the builder's sections, numbers, self-containment and bad input.

The store is real (tests/_report_store.py: the commands' own records at smoke size); the numbers
in the page are checked against the store read here with sqlite3 and numpy, not through the
report's own reader."""
import json
import re
import shutil
import sqlite3

import numpy as np
import pytest

from _report_store import make_store, numbers, tables
from conftest import run_cli


def read_store(folder) -> list[dict]:
    con = sqlite3.connect(f"{folder}/runs.db")
    try:
        rows = con.execute("SELECT id, kind, name, status, config, summary, history FROM runs ORDER BY id").fetchall()
    finally:
        con.close()
    return [{"id": i, "kind": k, "name": n, "status": s, "config": json.loads(c), "summary": json.loads(m),
             "history": json.loads(h)} for i, k, n, s, c, m, h in rows]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("store"))
    out = tmp_path_factory.mktemp("out")
    from backproplab.report.html import build_report
    res = build_report([store], out)
    return store, res, (out / "report.html").read_text()


def test_every_section_with_data_is_there(full):
    store, res, text = full
    assert res["sections"] == ["repro", "ladder", "curves", "misclassified", "datascale", "effects", "multipliers",
                               "scaling"]
    assert res["left_out"] == {}
    for name in res["sections"]:
        assert f'data-section="{name}"' in text
    assert text.count("<img ") == res["figures"] >= 8   # ladder, 2 curves, 2 grids, Pareto, loss-compute, data


def test_self_contained(full):
    _, res, text = full
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    import base64
    for s in srcs:   # each a real PNG
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["bytes"] < 5e6


def _close(cell, *expected, tol=0.0051):
    got = numbers(cell)
    assert len(got) == len(expected), (cell, expected)
    for g, e in zip(got, expected):
        assert abs(g - e) <= tol * max(1.0, abs(e)) if abs(e) > 100 else abs(g - e) <= tol, (cell, expected)


def test_numbers_equal_the_store(full):
    store, _, text = full
    recs = read_store(store)
    t = tables(text)
    by_id = {r["id"]: r for r in recs}
    # repro: mean +- sample sd over the seeds' final figures
    (attrs, cells), = [row for row in t["repro"] if "data-run" in row[0]]
    per = by_id[int(attrs["data-run"])]["summary"]["per_seed"]
    for col, key, d in ((3, "train_error", 2), (5, "test_error", 2), (6, "test_misses", 1)):
        v = np.array([p[key] for p in per], float)
        _close(cells[col], round(v.mean(), d), round(v.std(ddof=1), d), tol=0.51 * 10 ** -d)
    # the published rows are the paper's and the public reproduction's
    pub = [row for row in t["repro"] if row[0].get("class") == "published"]
    assert [numbers(c[5])[0] for _, c in pub] == [5.00, 4.09]
    # ladder: one row per rung, the store's records
    lad = t["ladder"]
    assert [a["data-rung"] for a, _ in lad] == ["1", "5"]
    for a, c in lad:
        r = by_id[int(a["data-run"])]
        assert r["kind"] == "ladder" and r["name"] == f"rung{a['data-rung']}-smoke"
        te = np.array([p["test_error"] for p in r["summary"]["per_seed"]])
        _close(c[4], round(te.mean(), 2), round(te.std(ddof=1), 2))
        assert int(c[2]) == r["config"]["train"]["passes"]
        # FLOPs: passes x 300 training digits x 6 x 63,660 MACs (the paper's net)
        _close(c[8], float(f"{2 * 300 * 6 * 63660:.2e}"), tol=1e-9)
    # effects: every row of the newest effects record, in its order
    eff = [r for r in recs if r["kind"] == "effects"][-1]["summary"]["rows"]
    rows = t["effects"]
    assert [a["data-method"] for a, _ in rows] == [r["method"] for r in eff]
    for (a, c), r in zip(rows, eff):
        _close(c[3], round(r["test_error"], 2), round(r["test_error_std"], 2))
        _close(c[6], round(r["seconds_per_seed"], 1), tol=0.051)
    _close(rows[1][1][4], *(round(r, 2) for r in (eff[1]["diff"], eff[1]["ci_low"], eff[1]["ci_high"])))
    # scaling: every cell, its best rate and validation loss
    cells = {r["id"]: r for r in recs if r["kind"] == "scale"}
    got = t["scale_cells"]
    assert sorted(int(a["data-run"]) for a, _ in got) == sorted(cells)
    for a, c in got:
        s = cells[int(a["data-run"])]["summary"]
        assert int(c[1]) == s["N"] and int(c[2]) == s["n_train"]
        assert numbers(c[5])[0] == pytest.approx(s["lr"], rel=1e-3)
        _close(c[6], round(s["val_loss"], 4), round(s["val_loss_sd"], 4), tol=5.1e-5)
    fit = {c[2]: c[3] for _, c in t["scale_fit"]}
    _close(fit["slope"], -0.0213, -0.0311, -0.0102, tol=1e-9)
    _close(fit["alpha"], 0.381, 0.21, 0.55, tol=1e-9)
    # data scaling: one row per (recipe, size), the cell's seeds
    ds = t["datascale"]
    assert [int(c[1]) for _, c in ds] == [200, 400]
    for a, c in ds:
        r = by_id[int(a["data-run"])]
        assert r["kind"] == "datascale" and r["config"]["data"]["n_train"] == int(c[1])
        te = np.array([p["test_error"] for p in r["summary"]["per_seed"]])
        _close(c[4], round(te.mean(), 2), round(te.std(ddof=1), 2))
    prog = {a["data-recipe"]: c for a, c in t["progress"]}
    assert list(prog) == ["rung1", "rung5"]
    _close(prog["rung5"][3], 4.75, 0.21, tol=1e-9)
    assert prog["rung5"][4] == "4.75× [3.1, inf]" and prog["rung1"][4] == "–"   # an open interval stays open
    _close(prog["rung5"][5], 2.5, 1.25, 6.0, tol=1e-9)
    dec = {a["data-factor"]: c for a, c in t["decomposition"]}
    _close(dec["algorithm"][1], 4.25, 3.0, 5.5, tol=1e-9)
    _close(dec["data"][2], 26, 10, 40, tol=1e-9)


def test_grid_is_the_checkpoint_replayed(full):
    """The grids say how many digits the run misclassified: the store's count for seed 0."""
    store, _, text = full
    recs = read_store(store)
    for name in ("smoke", "rung5-smoke"):
        r = [x for x in recs if x["name"] == name][-1]
        misses = r["summary"]["per_seed"][0]["test_misses"]
        n_test = r["config"]["data"]["n_test"]
        assert f"{name}, run {r['id']}, seed 0: {misses} of {n_test} test digits misclassified" in text


def test_provenance_of_every_item(full):
    store, res, text = full
    ids = re.findall(r'<(?:table|figure) id="((?:table|figure)-\d+)"', text)
    assert len(ids) == res["tables"] + res["figures"]
    for i in ids:
        assert f'id="prov-{i}"' in text and f'href="#prov-{i}"' in text
    git = read_env_git(store)
    assert git[:12] in text and "backproplab ladder --seeds 2 --smoke" in text


def read_env_git(store):
    con = sqlite3.connect(f"{store}/runs.db")
    try:
        return json.loads(con.execute("SELECT env FROM runs WHERE kind='ladder'").fetchone()[0])["git"]
    finally:
        con.close()


def test_sections_left_out_by_store_content(full, tmp_path):
    """A store of one repro run without its checkpoint: the 1989 table and its curves, no grid."""
    store, _, _ = full
    from backproplab.report.html import build_report
    from backproplab.store import add_run
    r = copy_repro(store, tmp_path / "a")
    (tmp_path / "b").mkdir()
    res = build_report([tmp_path / "a"], tmp_path / "out")
    assert res["sections"] == ["repro", "curves"]
    assert set(res["left_out"]) == {"ladder", "misclassified", "effects", "multipliers", "scaling", "datascale"}
    text = (tmp_path / "out" / "report.html").read_text()
    assert 'data-section="ladder"' not in text and "<img " in text
    # a checkpoint whose weights are not the recorded ones draws no grid
    shutil.copytree(f"{store}/checkpoints", tmp_path / "a" / "checkpoints")
    assert "misclassified" in build_report([tmp_path / "a"], tmp_path / "out")["sections"]
    s2 = dict(r["summary"], per_seed=[dict(p, weights_sha256="0" * 64) for p in r["summary"]["per_seed"]])
    add_run(tmp_path / "b", "repro", r["name"], r["status"], r["config"], s2, r["history"], {})
    shutil.copytree(f"{store}/checkpoints", tmp_path / "b" / "checkpoints")
    assert "misclassified" not in build_report([tmp_path / "b"], tmp_path / "out")["sections"]


def copy_repro(store, folder, **summary) -> dict:
    """A store holding a copy of the full store's repro record (no checkpoint); -> the record."""
    from backproplab.store import add_run
    r = [x for x in read_store(store) if x["kind"] == "repro"][-1]
    folder.mkdir()
    add_run(folder, "repro", r["name"], r["status"], r["config"], {**r["summary"], **summary}, r["history"], {})
    return r


def test_several_stores_and_json(full, tmp_path, capsys):
    store, res, _ = full
    copy_repro(store, tmp_path / "a")
    copy_repro(store, tmp_path / "b")
    from backproplab.cli import main
    assert main(["report", "--store", str(tmp_path / "a"), "--store", str(tmp_path / "b" / "runs.db"),
                 "--out", str(tmp_path / "o"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stores"] == [str(tmp_path / "a"), str(tmp_path / "b")] and out["runs"] == 2
    assert out["report"] == str(tmp_path / "o" / "report.html") and out["sections"] == ["repro", "curves"]
    rows = tables((tmp_path / "o" / "report.html").read_text())["repro"]
    assert [a.get("data-store") for a, _ in rows if "data-run" in a] == [str(tmp_path / "a"), str(tmp_path / "b")]


@pytest.mark.parametrize("case", ["missing", "damaged", "foreign", "out_is_file", "out_under_file", "empty"])
def test_bad_input_one_line_exit_2(full, tmp_path, case, capsys):
    store, _, _ = full
    args = ["--store", store, "--out", tmp_path / "out"]
    if case == "missing":
        args[1] = tmp_path / "nowhere"
    elif case == "damaged":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "runs.db").write_bytes(b"not a database at all" * 100)
        args[1] = tmp_path / "d"
    elif case == "foreign":
        (tmp_path / "f").mkdir()
        con = sqlite3.connect(tmp_path / "f" / "runs.db")
        con.execute("CREATE TABLE other (x)")
        con.commit()
        con.close()
        args[1] = tmp_path / "f"
    elif case == "out_is_file":
        (tmp_path / "out").write_text("a file")
    elif case == "out_under_file":
        (tmp_path / "x").write_text("a file")
        args[3] = tmp_path / "x" / "sub"
    elif case == "empty":
        from backproplab.store import add_run
        (tmp_path / "e").mkdir()
        add_run(tmp_path / "e", "speedrun", "speedrun", "finished", {}, {}, [], {})
        args[1] = tmp_path / "e"
    before = (tmp_path / "x").read_text() if case == "out_under_file" else None
    from backproplab.cli import main
    assert main(["report", *map(str, args)]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert cap.out == "" and len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert not (tmp_path / "out" / "report.html").exists()
    if case in ("missing", "damaged", "foreign", "empty"):   # the stores are read before the folder is made
        assert not (tmp_path / "out").exists()
    if case == "foreign":   # never modified
        con = sqlite3.connect(tmp_path / "f" / "runs.db")
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["other"]
        con.close()
    if before is not None:
        assert (tmp_path / "x").read_text() == before


def test_cli_error_is_one_line_without_traceback(tmp_path):
    p = run_cli("report", "--store", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith("error: no results store at ")
    assert len(p.stderr.strip().splitlines()) == 1


def test_failed_write_keeps_the_old_page(full, tmp_path, monkeypatch):
    store, _, _ = full
    copy_repro(store, tmp_path / "a")
    from backproplab.report import html
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("the old page")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(html.os, "replace", boom)
    with pytest.raises(html.UserError, match="No space left"):
        html.build_report([tmp_path / "a"], out)
    assert (out / "report.html").read_text() == "the old page"
    assert [p.name for p in out.iterdir()] == ["report.html"]   # no temporary file left


def test_effects_multipliers_column(full, tmp_path):
    """An effects record made with --multipliers: each method's compute multiplier and its interval."""
    store, _, _ = full
    from backproplab.report.html import build_report
    from backproplab.store import add_run
    rec = [x for x in read_store(store) if x["kind"] == "effects"][-1]
    rows = [dict(r) for r in rec["summary"]["rows"]]
    rows[1].update({"compute_x": 1.83, "compute_x_ci": [1.21, None], "compute_x_beyond_floor": False,
                    "compute_x_extrapolated": True})
    (tmp_path / "s").mkdir()
    add_run(tmp_path / "s", "effects", rec["name"], rec["status"], rec["config"],
            {**rec["summary"], "rows": rows, "multipliers": True}, [], {})
    res = build_report([tmp_path / "s"], tmp_path / "out")
    assert res["sections"] == ["effects"]
    got = {a["data-method"]: c for a, c in tables((tmp_path / "out" / "report.html").read_text())["effects"]}
    assert got[rows[1]["method"]][-1] == "1.83x [1.21, inf]*" and got["base"][-1] == "-"
