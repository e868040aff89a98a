"""The results store on a real PostgreSQL server reads and writes as the SQLite file does."""
import json
import os

import pytest

from backproplab import store
from backproplab.errors import UserError
from conftest import run_cli
from conftest_postgres import postgres_db, postgres_server  # noqa: F401

RECORDS = [("repro", "smoke", "finished", {"optim": {"lr": 0.03}}, {"config_digest": "abc", "test_error": 5.5},
            [{"pass": 1, "val": [{"error": 7.0}]}], {"python": "3"}),
           ("search", "smoke", "pruned", {"optim": {"lr": 0.1}}, {"config_digest": "def", "trial": 3},
            [], {"python": "3"}),
           ("repro", "smoke", "finished", {"optim": {"lr": 0.01}}, {"config_digest": "abc"}, [], {})]


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "created"} for r in recs]


def test_postgres_store_matches_sqlite(tmp_path, postgres_db):
    for rec in RECORDS:
        a = store.add_run(tmp_path, *rec)
        b = store.add_run(postgres_db, *rec)
        assert a == b  # ids count from 1 in both
    pg, lite = store.list_runs(postgres_db), store.list_runs(tmp_path)
    assert _strip(pg) == _strip(lite) and len(pg) == 3
    assert all(isinstance(r["created"], float) for r in pg)
    for args in (("repro", "abc", "finished"), ("search", "def", "pruned"), ("search", "abc", "finished")):
        assert store.recorded_run(postgres_db, *args) == store.recorded_run(tmp_path, *args)
    assert store.recorded_run(postgres_db, "repro", "abc", "finished") == 1
    store.check_store(postgres_db)
    # `runs` reads the shared store through --out URL
    r = run_cli("runs", "--out", postgres_db, "--json")
    assert r.returncode == 0, r.stderr
    ids = [x["id"] for x in json.loads(r.stdout.strip().splitlines()[-1])["runs"]]
    assert ids == [1, 2, 3]


def test_postgres_store_concurrent_writers_create_the_table_once(postgres_db):
    writers, each = 4, 6
    pids = []
    for w in range(writers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for i in range(each):
                    store.add_run(postgres_db, "test", f"w{w}-{i}", "finished", {}, {"w": w, "i": i}, [], {})
            except BaseException:  # noqa: BLE001 - the parent sees the exit code
                code = 1
            os._exit(code)
        pids.append(pid)
    codes = [os.waitpid(p, 0)[1] for p in pids]
    assert codes == [0] * writers
    runs = store.list_runs(postgres_db)
    assert sorted((r["summary"]["w"], r["summary"]["i"]) for r in runs) == \
        [(w, i) for w in range(writers) for i in range(each)]
    assert len({r["id"] for r in runs}) == writers * each


def test_postgres_store_refuses_a_foreign_runs_table(postgres_db):
    import sqlalchemy as sa
    eng = sa.create_engine(postgres_db, poolclass=sa.pool.NullPool)
    with eng.begin() as con:
        con.execute(sa.text("CREATE TABLE runs (id serial primary key, payload text)"))
        con.execute(sa.text("INSERT INTO runs (payload) VALUES ('theirs')"))
    for call in (lambda: store.check_store(postgres_db), lambda: store.list_runs(postgres_db),
                 lambda: store.add_run(postgres_db, *RECORDS[0])):
        with pytest.raises(UserError, match="not a backproplab results store"):
            call()
    with eng.begin() as con:
        assert con.execute(sa.text("SELECT payload FROM runs")).scalars().all() == ["theirs"]
    eng.dispose()


def test_postgres_store_unreachable_names_the_host(tmp_path, postgres_server):
    host, port = postgres_server
    url = f"postgresql+psycopg://postgres:secret@127.0.0.1:{port + 1 if port < 65535 else port - 1}/nothing"
    with pytest.raises(UserError) as e:
        store.add_run(url, *RECORDS[0])
    msg = str(e.value)
    assert "127.0.0.1:" in msg and "secret" not in msg and "\n" not in msg
    with pytest.raises(UserError, match="no results store"):
        store.list_runs(f"postgresql+psycopg://postgres@{host}:{port}/postgres")
    with pytest.raises(UserError, match="not supported"):
        store.add_run("mysql://x@y/z", *RECORDS[0])
