"""The fast kernels' first run: numba compiles them once (about a minute of CPU) and caches the machine
code in engine/__pycache__; every later process loads it in about a second. train() calls
prepare_kernels() before its first timed pass, so a cold cache is announced (what is happening
and how long it took) instead of showing up as a minute of "training".

Why here and not at install time: pip's editable and wheel installs run no post-install code,
and numba's cache is keyed by the kernel sources and the CPU, so a cache built at install is
dropped by the next edit of a kernel file or a move to another machine anyway; the first run
that needs the kernels is the one place that always knows whether they are compiled.
"""
import importlib
import time

KERNELS = (("_kernels_solo", "solo_pass"), ("_kernels_solo", "solo_grads"), ("_kernels_pop", "pop_pass"),
           ("_kernels_eval", "eval_pass"))
SLOW_S = 2.0          # a load that takes longer than this was a compilation
_prepared = False


def _dispatchers():
    return [getattr(importlib.import_module(f"{__package__}.{mod}"), fn) for mod, fn in KERNELS]


def cache_state() -> tuple[list, str | None]:
    """-> (names of the kernels with no compiled version for this CPU in numba's cache, and not
    loaded in this process; the cache folder). A kernel whose cache cannot be read counts as cold."""
    cold, where = [], None
    for disp in _dispatchers():
        try:
            cache = disp._cache._cache_file
            where = str(disp._cache._cache_path)
            if disp.signatures:                       # already compiled or loaded by this process
                continue
            magic = disp.targetctx.codegen().magic_tuple()
            if any(key[1] == magic for key in cache._load_index()):
                continue
        except (AttributeError, OSError, TypeError, IndexError, EOFError, ValueError):
            pass
        cold.append(disp.py_func.__name__)
    return cold, where


def prepare_kernels(say) -> float | None:
    """Once a process: if the kernels are not in numba's cache, say so, compile them (untimed by
    the caller) and say how long it took. -> the compile seconds, or None when nothing compiled."""
    global _prepared
    if _prepared:
        return None
    _prepared = True
    cold, where = cache_state()
    if not cold:
        return None
    from .kernelgrad import warm_up
    say(f"compiling the fast kernels ({', '.join(cold)}): once, about a minute of CPU time; "
        f"numba caches them in {where}")
    t0 = time.perf_counter()
    warm_up()
    dt = time.perf_counter() - t0
    say(f"compiled the fast kernels in {dt:.1f} s; later runs load them from the cache")
    return dt
