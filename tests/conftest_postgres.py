"""A throwaway PostgreSQL server on 127.0.0.1 for the tests named *postgres*.

initdb + pg_ctl from Debian's postgresql-15 binaries into a temporary folder owned by the
`postgres` user (the server refuses root: it runs under runuser when the tests run as root),
a free port, fsync off; stopped (fast) after the tests of the session. Import the fixtures in a
test module: `from conftest_postgres import postgres_server, postgres_db  # noqa: F401`.
A machine without the binaries fails the tests that need the server, naming what to install.
"""
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("BACKPROPLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))
_names = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd):
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _sh(cmd, **kw):
    r = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=60, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


@pytest.fixture(scope="session")
def postgres_server():
    """-> (host, port) of a running server; user postgres, trust authentication."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL binaries not found in {PG_BIN}: apt-get install -y postgresql")
    root = Path(tempfile.mkdtemp(prefix="bpl-pg-", dir="/tmp"))
    os.chmod(root, 0o700)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    data, log = root / "data", root / "log"
    _sh([PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"])
    _sh([PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-o",
         f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off "
         f"-c max_connections=60", "start"])
    try:
        yield "127.0.0.1", port
    finally:
        subprocess.run(_as_postgres([PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server):
    """A new empty database on the session's server -> its postgresql+psycopg:// URL."""
    host, port = postgres_server
    name = f"t{os.getpid()}_{next(_names)}"
    _sh([PG_BIN / "createdb", "-h", host, "-p", str(port), "-U", "postgres", name])
    return f"postgresql+psycopg://postgres@{host}:{port}/{name}"
