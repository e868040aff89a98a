"""The results store on a PostgreSQL server: the runs table of store.py through SQLAlchemy Core.

Same columns as the SQLite file (JSON text in config, summary, history, env), so every reader
of the store reads a shared one the same way. Each record is one transaction; the table is
created on the first write under an advisory lock (workers starting together create it once).
A runs table that lacks our columns is refused before anything is written; other tables in
the database (an Optuna study's) are left alone. A server that cannot be reached is one
UserError naming the host. Connections are not pooled: worker processes each open their own.
"""
import json
import time

from .errors import UserError

COLUMNS = ("id", "created", "kind", "name", "status", "config", "summary", "history", "env")
CONNECT_TIMEOUT_S = 10
_LOCK_KEY = 0x62706C72756E73  # pg_advisory_xact_lock key for creating the table ("bplruns")
_ENGINES: dict = {}


def sqlalchemy():
    try:
        import sqlalchemy as sa
        return sa
    except ImportError:
        raise UserError("a PostgreSQL store needs SQLAlchemy and psycopg: pip install -e '.[search]'") from None


def normalize_url(url: str) -> str:
    """postgresql:// names the driver explicitly (psycopg 3); other schemes are refused."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if not url.startswith("postgresql+psycopg://"):
        raise UserError(f"store URL {url.split('://', 1)[0]}://... is not supported: use "
                        f"postgresql+psycopg://USER@HOST:PORT/DB (an SQLite store is a folder)")
    return url


def describe(url: str) -> str:
    """host:port/db without the password, for messages."""
    sa = sqlalchemy()
    try:
        u = sa.engine.make_url(url)
    except Exception:  # noqa: BLE001 - a malformed URL is named as given, minus anything after '@'
        return url.split("@")[-1]
    return f"{u.host or 'localhost'}:{u.port or 5432}/{u.database or ''}"


def _table(sa, meta):
    return sa.Table("runs", meta,
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("created", sa.Float(53), nullable=False),
                    *[sa.Column(c, sa.Text, nullable=False) for c in COLUMNS[2:]])


def _engine(url: str):
    url = normalize_url(url)
    if url not in _ENGINES:
        sa = sqlalchemy()
        try:
            _ENGINES[url] = sa.create_engine(url, poolclass=sa.pool.NullPool,
                                             connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        except (sa.exc.ArgumentError, ImportError, ValueError) as e:
            raise UserError(f"bad store URL {describe(url)}: {e}") from None
    return _ENGINES[url]


def _fail(url: str, e, doing: str):
    msg = str(getattr(e, "orig", None) or e).strip().splitlines()
    return UserError(f"cannot {doing} results store at {describe(url)}: {msg[0] if msg else type(e).__name__}")


def _run(url: str, fn, doing: str):
    """fn(connection, sa, table_present) inside one transaction; database errors become one UserError."""
    sa = sqlalchemy()
    eng = _engine(url)
    try:
        with eng.begin() as con:
            return fn(con, sa)
    except sa.exc.SQLAlchemyError as e:
        raise _fail(url, e, doing) from None


def _foreign_reason(con, sa) -> str | None:
    insp = sa.inspect(con)
    if not insp.has_table("runs"):
        return None
    cols = {c["name"] for c in insp.get_columns("runs")}
    missing = [c for c in COLUMNS if c not in cols]
    return f"its runs table lacks {', '.join(missing)}" if missing else None


def _has_table(con, sa) -> bool:
    return sa.inspect(con).has_table("runs")


def check(url: str) -> None:
    def fn(con, sa):
        reason = _foreign_reason(con, sa)
        if reason:
            raise UserError(f"{describe(url)} is not a backproplab results store ({reason}); nothing was written to it")
    _run(url, fn, "reach")


def add_run(url: str, kind, name, status, config, summary, history, env) -> int:
    row = {"created": time.time(), "kind": kind, "name": name, "status": status, "config": json.dumps(config),
           "summary": json.dumps(summary), "history": json.dumps(history), "env": json.dumps(env)}

    def fn(con, sa):
        reason = _foreign_reason(con, sa)
        if reason:
            raise UserError(f"{describe(url)} is not a backproplab results store ({reason}); nothing was written to it")
        meta = sa.MetaData()
        runs = _table(sa, meta)
        if not _has_table(con, sa):  # workers starting together: one creates it, the others wait and see it
            con.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            meta.create_all(con, checkfirst=True)
        return int(con.execute(runs.insert().values(**row).returning(runs.c.id)).scalar_one())
    return _run(url, fn, "write")


def list_runs(url: str) -> list[dict]:
    def fn(con, sa):
        reason = _foreign_reason(con, sa)
        if reason:
            raise UserError(f"{describe(url)} is not a backproplab results store ({reason})")
        if not _has_table(con, sa):
            raise UserError(f"no results store at {describe(url)} (nothing has been recorded there yet)")
        runs = _table(sa, sa.MetaData())
        return con.execute(sa.select(*[runs.c[c] for c in COLUMNS]).order_by(runs.c.id)).all()
    from .store import decode_rows
    return decode_rows(_run(url, fn, "read"), describe(url))


def recorded_run(url: str, kind: str, digest: str, status: str) -> int | None:
    def fn(con, sa):
        if not _has_table(con, sa):
            return None
        runs = _table(sa, sa.MetaData())
        rows = con.execute(sa.select(runs.c.id, runs.c.summary).where(runs.c.kind == kind, runs.c.status == status)
                           .order_by(runs.c.id)).all()
        for rid, summ in rows:
            try:
                if json.loads(summ).get("config_digest") == digest:
                    return int(rid)
            except (TypeError, ValueError, AttributeError):
                continue
        return None
    return _run(url, fn, "read")


def status_counts(url: str) -> dict | None:
    """status -> runs, read with one query (no run's columns loaded); None when no runs table exists
    yet; a foreign runs table or an unreachable server is one UserError. For `doctor --store URL`."""
    def fn(con, sa):
        reason = _foreign_reason(con, sa)
        if reason:
            raise UserError(f"{describe(url)} is not a backproplab results store ({reason})")
        if not _has_table(con, sa):
            return None
        runs = _table(sa, sa.MetaData())
        return dict(con.execute(sa.select(runs.c.status, sa.func.count()).group_by(runs.c.status)).all())
    return _run(url, fn, "reach")
