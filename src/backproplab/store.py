"""Results store: one SQLite file per output folder, one row per run, JSON columns.

Records are written in one transaction, so a process killed mid-write leaves the store
as it was. Several processes may write the same store at once: WAL journaling lets
readers and one writer overlap, the busy timeout makes a writer wait for another, and
a write that still finds the database locked (SQLite gives up at once in a few cases,
such as two connections both upgrading a read to a write) is retried with backoff.

A file that is not a backproplab store (another program's SQLite database, anything
else) is never modified: a read-only connection checks every existing file before any
other connection opens it. A store a killed writer left (a WAL file to recover, or an
empty database) reads as the records it holds.

A PostgreSQL URL (postgresql+psycopg://user@host:port/db) in place of the folder selects one
shared store on a server, with the same runs table (SQLAlchemy Core, imported only then): every
function here takes either. Other tables in that database (an Optuna study's, say) are left
alone; a runs table lacking our columns is refused as a foreign one is in a file.
"""
import json
import random
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
COLUMNS = ("id", "created", "kind", "name", "status", "config", "summary", "history", "env")
BUSY_TIMEOUT_S = 30.0     # how long one statement waits for another writer's lock
RETRIES = 8               # further attempts after "database is locked"; backoff 0.05 s doubling to 2 s


def _busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _with_retries(fn):
    delay = 0.05
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _busy(e) or attempt == RETRIES:
                raise
            time.sleep(delay * (1.0 + random.random()))  # jitter: writers that collided do not collide again
            delay = min(2 * delay, 2.0)


def _uri(path: Path, mode: str) -> str:
    return f"{path.resolve().as_uri()}?mode={mode}"  # as_uri quotes '?', '#' and spaces in the path


def _foreign_reason(con: sqlite3.Connection) -> str | None:
    """None for a backproplab store or an empty database; else what is wrong with it."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()}
    if not tables - {"sqlite_sequence"}:
        return None
    if "runs" not in tables:
        return "it has no runs table"
    cols = {r[1] for r in con.execute("PRAGMA table_info(runs)").fetchall()}
    missing = [c for c in COLUMNS if c not in cols]
    return f"its runs table lacks {', '.join(missing)}" if missing else None


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection that never writes the file (nor creates one)."""
    con = sqlite3.connect(_uri(path, "ro"), uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        _with_retries(lambda: con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall())
        return con
    except sqlite3.OperationalError as e:
        con.close()
        if "unable to open" not in str(e) and "readonly" not in str(e):
            raise
    # A WAL file a killed writer left needs recovery, which a read-only connection may not do,
    # and in a folder nobody may write no -shm file can be made: read the main file as it is
    # (it holds every checkpointed record and the schema).
    return sqlite3.connect(_uri(path, "ro") + "&immutable=1", uri=True)


def _check_file(path: Path) -> None:
    """Refuse a file that is not a backproplab store, touching nothing in it."""
    try:
        con = _connect_ro(path)
        try:
            reason = _with_retries(lambda: _foreign_reason(con))
        finally:
            con.close()
    except sqlite3.OperationalError as e:  # the file may be fine: the disk, permissions, a lock
        raise UserError(f"cannot read results store {path}: {e}") from None
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path} is not a usable results store ({e})") from None
    if reason:
        raise UserError(f"{path} is not a backproplab results store ({reason}); nothing was written to it")
    try:  # our store: an ordinary connection's close removes the -wal and -shm files the check left
        con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        pass  # a read-only folder: nothing was created there either


def open_store_readonly(path: Path) -> sqlite3.Connection:
    """A connection for reading a checked store: an ordinary one where the folder is writable
    (so that closing it leaves no -wal and -shm files), else a read-only one."""
    path = Path(path)
    _check_file(path)
    try:
        con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
        try:
            _with_retries(lambda: con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone())
            return con
        except sqlite3.OperationalError:
            con.close()
        return _connect_ro(path)  # a read-only folder or file
    except sqlite3.DatabaseError as e:
        raise UserError(f"results store {path} is unreadable: {e}") from None


def _connect_write(path: Path) -> sqlite3.Connection:
    if path.exists():
        _check_file(path)  # before anything (even the journal mode) changes it

    def connect():
        con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
        try:
            con.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(SCHEMA)
            con.commit()
        except BaseException:
            con.close()
            raise
        return con
    return _with_retries(connect)


def store_path(folder) -> Path:
    return Path(folder) / DB_NAME


def check_store(folder) -> None:
    """Before a long job: refuse an output folder whose runs.db is not a usable store
    (or a store URL that cannot be reached or holds a foreign runs table)."""
    if is_url(folder):
        return _pg().check(str(folder))
    path = store_path(folder)
    if path.exists():
        _check_file(path)


def add_run(folder, kind: str, name: str, status: str, config: dict, summary: dict, history: list,
            env: dict) -> int:
    if is_url(folder):
        return _pg().add_run(str(folder), kind, name, status, config, summary, history, env)
    path = store_path(folder)
    row = (time.time(), kind, name, status, json.dumps(config), json.dumps(summary), json.dumps(history),
           json.dumps(env))
    try:
        con = _connect_write(path)
        try:
            def insert():
                with con:  # one transaction: all of the record or none of it
                    cur = con.execute("INSERT INTO runs (created, kind, name, status, config, summary, history, env) "
                                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                    return int(cur.lastrowid)
            return _with_retries(insert)
        finally:
            con.close()
    except sqlite3.Error as e:  # full disk, read-only file, locked for longer than all retries
        raise UserError(f"cannot write results store {path}: {e}") from None


def list_runs(folder) -> list[dict]:
    """folder: an output folder holding runs.db, the path of a store file itself, or a store URL."""
    if is_url(folder):
        return _pg().list_runs(str(folder))
    path = Path(folder)
    if not path.is_file():
        path = store_path(folder)
    if not path.is_file():
        raise UserError(f"no results store at {path} (run something with --out {folder} first)")
    con = open_store_readonly(path)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone():
            return []  # created by a writer killed before its first record
        rows = _with_retries(lambda: con.execute(f"SELECT {', '.join(COLUMNS)} FROM runs ORDER BY id").fetchall())
    except sqlite3.DatabaseError as e:
        raise UserError(f"results store {path} is unreadable: {e}") from None
    finally:
        con.close()
    return decode_rows(rows, path)


def decode_rows(rows, where) -> list[dict]:
    """Stored rows (COLUMNS order) -> run dicts with their JSON columns parsed; a damaged column is
    one error naming the store (`where`) and the run. Shared by the SQLite and PostgreSQL stores."""
    out = []
    for row in rows:
        rec = dict(zip(COLUMNS, row))
        try:
            for k in ("config", "summary", "history", "env"):
                rec[k] = json.loads(rec[k])
        except (TypeError, ValueError) as e:
            raise UserError(f"results store {where}: run {rec['id']} has a damaged {k} column ({e})") from None
        out.append(rec)
    return out


def recorded_run(folder, kind: str, digest: str, status: str) -> int | None:
    """Id of a run of this kind, config digest and status already in the store of folder
    (None if there is none or no store yet): a resumed run that was already final is not
    recorded twice."""
    if is_url(folder):
        return _pg().recorded_run(str(folder), kind, digest, status)
    if not store_path(folder).is_file():
        return None
    for r in list_runs(folder):
        if r["kind"] == kind and r["summary"].get("config_digest") == digest and r["status"] == status:
            return int(r["id"])
    return None


def is_url(target) -> bool:
    """A store given as a URL (postgresql+psycopg://...) rather than a folder."""
    return isinstance(target, str) and "://" in target


def where(target) -> str:
    """A store for messages: a folder or file as given, a URL as host:port/db (no password)."""
    return _pg().describe(str(target)) if is_url(target) else str(target)


def _pg():
    from . import store_pg
    return store_pg
