"""Results store: one SQLite file per output folder, one row per run, JSON columns.

Records are written in one transaction; WAL and a busy timeout let several processes
write the same store.
"""
import json
import sqlite3
import time
from pathlib import Path

from .errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    summary TEXT NOT NULL,
    history TEXT NOT NULL,
    env TEXT NOT NULL
)
"""
DB_NAME = "runs.db"


def _connect(path: Path, create: bool = True) -> sqlite3.Connection:
    """create=False opens an existing store for reading and refuses a file that is not one
    (a foreign SQLite database is never modified)."""
    try:
        if not create:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
            con.execute("PRAGMA busy_timeout=30000")
            cols = [r[1] for r in con.execute("PRAGMA table_info(runs)").fetchall()]
            if not {"kind", "config", "summary", "history"} <= set(cols):
                con.close()
                raise UserError(f"{path} is not a backproplab results store (no runs table)")
            return con
        con = sqlite3.connect(str(path), timeout=30.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=30000")
        con.execute(SCHEMA)
        return con
    except sqlite3.DatabaseError as e:
        raise UserError(f"results store {path} is unusable: {e}") from None


def store_path(folder) -> Path:
    return Path(folder) / DB_NAME


def add_run(folder, kind: str, name: str, status: str, config: dict, summary: dict, history: list,
            env: dict) -> int:
    con = _connect(store_path(folder))
    try:
        with con:
            cur = con.execute(
                "INSERT INTO runs (created, kind, name, status, config, summary, history, env) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), kind, name, status, json.dumps(config), json.dumps(summary),
                 json.dumps(history), json.dumps(env)))
            return int(cur.lastrowid)
    finally:
        con.close()


def list_runs(folder) -> list[dict]:
    """folder: an output folder holding runs.db, or the path of a store file itself."""
    path = Path(folder)
    if not path.is_file():
        path = store_path(folder)
    if not path.is_file():
        raise UserError(f"no results store at {path} (run something with --out {folder} first)")
    con = _connect(path, create=False)
    try:
        rows = con.execute("SELECT id, created, kind, name, status, config, summary, history, env "
                           "FROM runs ORDER BY id").fetchall()
    except sqlite3.DatabaseError as e:
        raise UserError(f"results store {path} is unreadable: {e}") from None
    finally:
        con.close()
    keys = ("id", "created", "kind", "name", "status", "config", "summary", "history", "env")
    out = []
    for row in rows:
        rec = dict(zip(keys, row))
        for k in ("config", "summary", "history", "env"):
            rec[k] = json.loads(rec[k])
        out.append(rec)
    return out
