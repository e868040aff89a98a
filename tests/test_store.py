"""The results store loses nothing: concurrent writers, locks, killed writers, foreign files."""
import hashlib
import json
import os
import random
import signal
import sqlite3
import threading
import time

import pytest

from backproplab import store
from backproplab.errors import UserError
from backproplab.store import add_run, check_store, list_runs

WRITERS, RECORDS = 4, 25


def _record(w: int, i: int):
    """A record whose every column can be checked: a history of i+1 entries and a digest of it."""
    history = [{"pass": k + 1, "w": w, "loss": (w + 1) * 0.5 / (k + 1)} for k in range(i + 1)]
    blob = hashlib.sha256(json.dumps(history).encode()).hexdigest()
    return ("test", f"w{w}-{i}", "finished", {"writer": w}, {"writer": w, "i": i, "blob": blob}, history,
            {"pid": w})


def _check_intact(rec):
    s = rec["summary"]
    assert rec["history"] == _record(s["writer"], s["i"])[5]
    assert hashlib.sha256(json.dumps(rec["history"]).encode()).hexdigest() == s["blob"]
    assert rec["name"] == f"w{s['writer']}-{s['i']}" and rec["config"] == {"writer": s["writer"]}


def _fork(fn):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - the parent sees the exit code
            code = 1
        os._exit(code)
    return pid


def test_concurrent_writers_lose_nothing(tmp_path):
    go = tmp_path / "go"
    seen = tmp_path / "seen.json"

    def writer(w):
        while not go.exists():  # start together
            time.sleep(0.001)
        for i in range(RECORDS):
            add_run(tmp_path, *_record(w, i))

    def reader():  # lists while the writers write: every record it sees is whole
        while not go.exists():
            time.sleep(0.001)
        counts = []
        while not counts or counts[-1] < WRITERS * RECORDS:
            try:
                runs = list_runs(tmp_path)
            except UserError as e:
                if "no results store" not in str(e):
                    raise
                runs = []
            for r in runs:
                _check_intact(r)
            counts.append(len(runs))
        seen.write_text(json.dumps(counts))

    pids = [_fork(lambda w=w: writer(w)) for w in range(WRITERS)] + [_fork(reader)]
    go.touch()
    codes = [os.waitpid(p, 0)[1] for p in pids]
    assert codes == [0] * (WRITERS + 1)
    runs = list_runs(tmp_path)
    assert len(runs) == WRITERS * RECORDS and len({r["id"] for r in runs}) == WRITERS * RECORDS
    for r in runs:
        _check_intact(r)
    assert {(r["summary"]["writer"], r["summary"]["i"]) for r in runs} == \
           {(w, i) for w in range(WRITERS) for i in range(RECORDS)}
    for w in range(WRITERS):  # each writer's records in the order it wrote them
        mine = [r["summary"]["i"] for r in runs if r["summary"]["writer"] == w]
        assert mine == list(range(RECORDS))
    counts = json.loads(seen.read_text())
    assert counts == sorted(counts)  # the reader never saw a record disappear


def _hold_write_lock(path, seconds, ready):
    con = sqlite3.connect(str(path), timeout=0.0, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    ready.set()
    time.sleep(seconds)
    con.execute("COMMIT")
    con.close()


@pytest.mark.parametrize("retries, ok", [(store.RETRIES, True), (0, False)])
def test_locked_store_is_retried(tmp_path, monkeypatch, retries, ok):
    add_run(tmp_path, *_record(0, 0))
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.05)  # SQLite's own wait ends long before the lock does
    monkeypatch.setattr(store, "RETRIES", retries)
    ready = threading.Event()
    t = threading.Thread(target=_hold_write_lock, args=(store.store_path(tmp_path), 1.5, ready))
    t.start()
    ready.wait()
    try:
        if ok:
            add_run(tmp_path, *_record(0, 1))
        else:
            with pytest.raises(UserError, match="cannot write results store .*locked"):
                add_run(tmp_path, *_record(0, 1))
    finally:
        t.join()
    assert [r["summary"]["i"] for r in list_runs(tmp_path)] == ([0, 1] if ok else [0])


def test_writer_killed_anywhere_leaves_whole_records(tmp_path):
    """A writer SIGKILLed at random instants: every record in the store is complete, and
    records are only ever added (an id once listed stays, with the same content)."""
    rng = random.Random(7)
    listed = {}
    for k in range(12):
        pid = _fork(lambda k=k: [add_run(tmp_path, *_record(k, i)) for i in range(40)])
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not store.store_path(tmp_path).exists():
            continue
        for r in list_runs(tmp_path):
            _check_intact(r)
            assert listed.setdefault(r["id"], r["summary"]) == r["summary"]
    con = sqlite3.connect(str(store.store_path(tmp_path)))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    rid = add_run(tmp_path, *_record(99, 0))  # still writable; nothing listed before was lost
    runs = list_runs(tmp_path)
    assert {r["id"] for r in runs} >= set(listed) and runs[-1]["id"] == rid > max(listed, default=0)


def _foreign(path, sql):
    con = sqlite3.connect(str(path))
    con.executescript(sql)
    con.commit()
    con.close()
    return path.read_bytes()


@pytest.mark.parametrize("sql, words", [
    ("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann');", "no runs table"),
    ("CREATE TABLE runs (id INTEGER, name TEXT); INSERT INTO runs VALUES (1, 'x');", "lacks created, kind"),
])
def test_foreign_database_is_never_modified(tmp_path, sql, words):
    db = store.store_path(tmp_path)
    before = _foreign(db, sql)
    for fn in (lambda: add_run(tmp_path, *_record(0, 0)), lambda: list_runs(tmp_path), lambda: list_runs(db),
               lambda: check_store(tmp_path)):
        with pytest.raises(UserError, match=words):
            fn()
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs.db"]


def test_not_a_database_and_damaged_rows(tmp_path):
    db = store.store_path(tmp_path)
    db.write_bytes(b"not sqlite at all " * 64)
    with pytest.raises(UserError, match="not a usable results store"):
        add_run(tmp_path, *_record(0, 0))
    assert db.read_bytes() == b"not sqlite at all " * 64
    db.unlink()
    add_run(tmp_path, *_record(0, 0))
    con = sqlite3.connect(str(db))
    con.execute("UPDATE runs SET summary = '{broken'")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="run 1 has a damaged summary"):
        list_runs(tmp_path)


def test_reading_leaves_the_store_byte_identical(tmp_path):
    for i in range(3):
        add_run(tmp_path, *_record(1, i))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(list_runs(tmp_path)) == 3
    check_store(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---- doctor: store health and checkpoints, in words, touching nothing ---------------------
def _doctor(out, data=None):
    from backproplab.doctor import run_doctor
    return {c["check"]: c for c in run_doctor(out, data=data)}


def test_doctor_reports_store_checkpoints_and_data_in_words(tmp_path, capsys):
    from backproplab.cli import main
    from backproplab.engine.checkpoint import prev_path, save_checkpoint
    ck = tmp_path / "checkpoints" / "run-abc.pt"
    ck.parent.mkdir()
    for k in (1, 2):  # the second save keeps the first as run-abc.prev.pt
        save_checkpoint(ck, {"config": "{}", "passes_done": k})
    add_run(tmp_path, *_record(0, 0))
    healthy = _doctor(tmp_path)
    assert all(c["ok"] for c in healthy.values()), healthy
    assert "1 run (1 finished)" in healthy["results store"]["detail"]
    assert "2 checkpoint files verified" in healthy["checkpoints"]["detail"]

    raw = bytearray(ck.read_bytes())
    raw[-3] ^= 1
    ck.write_bytes(bytes(raw))
    (ck.parent / f".{ck.name}.tmp.99999999").write_bytes(b"half")
    db = store.store_path(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    sick = _doctor(tmp_path, data=tmp_path / "no-such-idx")
    assert {k for k, c in sick.items() if not c["ok"]} == {"checkpoints", "data folder"}
    words = sick["checkpoints"]["detail"]
    assert "run-abc.pt is corrupt" in words and f"will continue from {prev_path(ck).name}" in words
    assert "1 temporary files of killed runs" in words
    assert "does not exist" in sick["data folder"]["detail"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    db.unlink()
    _foreign(db, "CREATE TABLE users (name TEXT);")
    foreign = _doctor(tmp_path)
    assert not foreign["results store"]["ok"] and "no runs table" in foreign["results store"]["detail"]
    capsys.readouterr()
    assert main(["doctor", "--out", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["ok"] is False and {c["check"] for c in report["checks"] if not c["ok"]} == \
           {"results store", "checkpoints"}
