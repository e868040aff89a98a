"""Several processes opening the same new PostgreSQL database at once (a command and a worker
started together, or a test's poller beside the command): Optuna creates its tables on first open,
and concurrent creations collide. Every opener must get the storage."""
import multiprocessing

from conftest_postgres import postgres_db, postgres_server  # noqa: F401


def _open(url, barrier, q):
    from backproplab.errors import UserError
    from backproplab.search import study as st
    barrier.wait()
    try:
        st.StorageSpec(url, 1.0).open()
        q.put("ok")
    except UserError as e:
        q.put(str(e))


def test_postgres_storage_opened_by_many_processes_at_once_on_a_new_database(postgres_db):
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(postgres_db, barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert got == ["ok"] * n, got
