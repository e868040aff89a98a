"""Run several train(cfg) calls, `jobs` at a time in spawned worker processes.

Each config checkpoints under its own name and digest, so with resume=True a finished
config returns at once and a stopped one continues where it was.
"""
import concurrent.futures as cf
import ctypes
import multiprocessing as mp
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """A pool worker's initializer: the kernel sends this process SIGKILL when its parent dies
    (Linux prctl), so a killed command leaves no workers training on; elsewhere a no-op. A parent
    that died before the call is caught by the ppid check."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def _run_one(cfg_dict, out, resume):
    from ..config import from_dict
    from ..engine.train import train
    return train(from_dict(cfg_dict), out=out, resume=resume)


def run_configs(cfgs: dict, out, resume: bool, jobs: int, log=print, describe=None) -> dict:
    """cfgs: key -> Config. Longest runs first. -> key -> Result."""
    cost = lambda k: cfgs[k].train.passes * (cfgs[k].data.n_train or 10_000) * cfgs[k].train.seeds  # noqa: E731
    order = sorted(cfgs, key=cost, reverse=True)
    describe = describe or (lambda k, res: f"{k} done in {res.seconds:.1f} s")
    results = {}
    if jobs <= 1 or len(cfgs) == 1:
        for k in order:
            results[k] = _run_one(cfgs[k].to_dict(), out, resume)
            log(describe(k, results[k]))
        return results
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                initargs=(os.getpid(),)) as pool:
        futs = {pool.submit(_run_one, cfgs[k].to_dict(), out, resume): k for k in order}
        for fut in cf.as_completed(futs):
            k = futs[fut]
            results[k] = fut.result()
            log(describe(k, results[k]))
    return results
