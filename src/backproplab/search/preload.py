"""Imported once by the search's fork server (study._context): besides torch, Optuna and the engine,
the fast kernels' machine code, loaded from numba's cache, so that every worker forked from the
server starts with them in memory instead of reading the cache itself. Measured (docs/scale-out.md):
2% of a 40-trial grid's wall time when the server is reused (recovery rounds, repeated runs in
one process); in a fresh command the load only moves from the workers to the server. Nothing is
compiled here: with a cold cache (or a CPU the kernels do not run on) the import does nothing and
the first run announces the compilation as usual (engine/warmup.py)."""
from ..engine.kernelgrad import _cpu_reason, warm_up
from ..engine.warmup import cache_state

if _cpu_reason() is None and not cache_state()[0]:
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - only a head start: a worker that lacks the kernels loads them itself
        pass
