"""Pool workers die with the command that started them: a killed `effects --jobs 2` or `scale
run --jobs 2` leaves no worker training on."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent("""
    import concurrent.futures as cf, multiprocessing as mp, os, sys, time
    from backproplab.experiments.pool import die_with_parent

    def work(path):
        open(path, "w").write(str(os.getpid()))
        time.sleep(60)

    if __name__ == "__main__":
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                    initargs=(os.getpid(),)) as pool:
            pool.submit(work, sys.argv[1]).result()
""")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead


def test_a_worker_dies_when_its_parent_is_killed(tmp_path):
    script, pidfile = tmp_path / "pool.py", tmp_path / "worker.pid"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)], env=env)
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    assert _alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the worker outlived its killed parent"


def test_runs_off_the_kernel_path_are_started_first(monkeypatch):
    """The longest-first order counts the path: an autograd-path config (batchnorm) costs
    AUTOGRAD_COST times a kernel-path one of the same size where the kernels run, and starts
    before it; more passes or seeds cost more on either path."""
    from backproplab.config import apply_overrides, preset
    from backproplab.engine.kernelgrad import kernel_reason
    from backproplab.experiments import pool
    base = apply_overrides(preset("modern_smoke"), ["train.passes=2"])
    norm = apply_overrides(preset("modern_smoke"), ["train.passes=2", "+method=batchnorm"])
    longer = apply_overrides(preset("modern_smoke"), ["train.passes=6"])
    kernels = kernel_reason(base) is None
    assert pool.relative_cost(norm) == pool.relative_cost(base) * (pool.AUTOGRAD_COST if kernels else 1.0)
    assert pool.relative_cost(longer) == 3 * pool.relative_cost(base)
    started = []
    monkeypatch.setattr(pool, "_run_one", lambda cfg, out, resume, progress=None: started.append(cfg["name"])
                        or type("R", (), {"seconds": 0.0})())
    cfgs = {"base": base, "norm": norm, "longer": longer}
    for k, c in cfgs.items():
        c.name = k
    results = pool.run_configs(cfgs, None, False, 1, log=lambda *a: None)
    assert started == (["norm", "longer", "base"] if kernels else ["longer", "base", "norm"])
    assert list(results) == ["base", "norm", "longer"]        # handed back in the caller's order
