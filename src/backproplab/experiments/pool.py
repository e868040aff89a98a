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


def _run_one(cfg_dict, out, resume, progress=None):
    from ..config import from_dict
    from ..engine.train import train
    return train(from_dict(cfg_dict), out=out, resume=resume, progress=progress)


# Off the numba kernels a net1989 step costs about 4-10x as much (docs/results.md: 12-31 s a seed on
# the autograd path against 3-4 on the kernels); the low end keeps the order of the kernel rows
AUTOGRAD_COST = 4.0


def relative_cost(cfg) -> float:
    """A config's training time in arbitrary units, for the longest-first order: examples seen x
    seeds, times AUTOGRAD_COST when the population engine cannot take its kernel path."""
    from ..engine.population import fused_reason, run_specs
    from ..errors import UserError
    try:
        slow = fused_reason(cfg, run_specs(cfg), "kernel") is not None
    except UserError:   # a config the engine will refuse with its own message: order it anywhere
        slow = False
    return cfg.train.passes * (cfg.data.n_train or 10_000) * cfg.train.seeds * (AUTOGRAD_COST if slow else 1.0)


def run_configs(cfgs: dict, out, resume: bool, jobs: int, log=print, describe=None, label: str = "runs") -> dict:
    """cfgs: key -> Config. Longest runs first (relative_cost: with `jobs` workers the last runs
    to start are short, so no worker idles long at the end). -> key -> Result. A progress bar of
    the configs (`label`, e.g. "ladder rungs") on a terminal; run one at a time, a bar of passes
    under it. The results come back in cfgs' order."""
    from ..report.progress import ProgressBar, bar
    costs = {k: relative_cost(c) for k, c in cfgs.items()}
    order = sorted(cfgs, key=costs.get, reverse=True)
    describe = describe or (lambda k, res: f"{k} done in {res.seconds:.1f} s")
    results = {}
    if jobs <= 1 or len(cfgs) == 1:
        with bar(label, len(order)) as runs_bar:
            for k in order:
                name = " ".join(map(str, k)) if isinstance(k, tuple) else str(k)
                passes = ProgressBar(cfgs[k].train.passes, label=f"{name}: pass")
                results[k] = _run_one(cfgs[k].to_dict(), out, resume, passes)
                passes.clear()
                log(describe(k, results[k]))
                runs_bar.advance()
        return {k: results[k] for k in cfgs}
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                initargs=(os.getpid(),)) as pool, bar(label, len(order)) as runs_bar:
        futs = {pool.submit(_run_one, cfgs[k].to_dict(), out, resume): k for k in order}
        for fut in cf.as_completed(futs):
            k = futs[fut]
            results[k] = fut.result()
            log(describe(k, results[k]))
            runs_bar.advance()
    return {k: results[k] for k in cfgs}   # in the caller's order, whatever order they ran in
