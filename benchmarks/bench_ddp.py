"""Data-parallel overhead: 2 local ranks (torchrun, DDP over gloo) against one process, same global batch.

    python benchmarks/bench_ddp.py [--repeats K] [--digits N] [--out FILE.json]

The script launches itself under torchrun (2 ranks on this machine, --nnodes=1, loopback,
OMP_NUM_THREADS=1). In each repeat, rank 0 first trains one pass over the first N training
digits in one process (engine Population; rank 1 waits at a barrier), then both ranks train
the same pass data-parallel (engine/ddp.DDPPopulation: each rank the gradient of half of
every batch, DDP averaging). The two blocks alternate, so a change in the machine's load hits
both; a block is timed from a barrier to a barrier. Per case: seconds per step of each, the
median over the repeats, and the ratio ddp / single (> 1: data-parallel is slower).
Cases: the modern preset (kernel path: ReLU, dropout 0.25, shifts, AdamW) at R = 1 replica,
batch 32, and at R = 8, batch 128, both on the kernel path, and the autograd path at R = 1,
batch 32 (where a step costs more, so the all-reduce weighs less).
max_weight_difference_after (single against 2 ranks after all repeats) is float rounding
magnified by AdamW: its step m / sqrt(v) does not depend on a gradient's scale, so a
coordinate whose gradient is near zero (terms cancelling) moves by up to lr on rounding
alone; with SGD the same 30 steps at R = 8 stay within 1.2e-7.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CASES = {"kernel R=1 B=32": (1, 32, "kernel"), "kernel R=8 B=128": (8, 128, "kernel"),
         "autograd R=1 B=32": (1, 32, "autograd")}


def worker(repeats: int, digits: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from backproplab.config import apply_overrides, preset
    from backproplab.data import load_dataset, pass_randomness
    from backproplab.engine import ddp
    from backproplab.engine.population import Population

    torch.set_num_threads(1)
    data = load_dataset()
    x = data.train_x.reshape(-1, 16, 16).numpy()[:digits]
    labels = data.train_labels.numpy()[:digits]
    res = {}
    for name, (R, B, path) in CASES.items():
        cfg = apply_overrides(preset("modern"), [f"train.batch={B}", f"train.seeds={R}"])
        seeds = list(range(R))
        dctx = ddp.from_env(cfg)
        pops = {"ddp": ddp.DDPPopulation(cfg, seeds, dctx, path=path)}
        if dctx.rank == 0:
            pops["single"] = Population(cfg, seeds, path=path)
        times = {"single": [], "ddp": []}
        steps = -(-digits // B)
        for rep in range(repeats + 1):  # the first repeat warms up (numba, allocations) and is dropped
            rand = [pass_randomness(s, rep, digits, cfg.train.shift, cfg.model.dropout, pops["ddp"].dropout_units)
                    for s in seeds]
            shifts, keep = np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand])
            for kind in ("single", "ddp"):
                dist.barrier()
                t0 = time.perf_counter()
                if kind in pops:
                    pops[kind].train_pass(x, labels, None, shifts, keep)
                    pops[kind].end_pass()
                dist.barrier()
                if rep:
                    times[kind].append((time.perf_counter() - t0) / steps)
        if dctx.rank == 0:
            med = {k: statistics.median(v) for k, v in times.items()}
            same = float(np.abs(pops["single"].W.numpy() - pops["ddp"].W.numpy()).max())
            res[name] = {"replicas": R, "batch": B, "path": pops["ddp"].path, "steps_per_block": steps,
                         "single_ms_per_step": 1e3 * med["single"], "ddp_ms_per_step": 1e3 * med["ddp"],
                         "ratio_ddp_over_single": med["ddp"] / med["single"],
                         "max_weight_difference_after": same,
                         "single_ms_all": [1e3 * t for t in times["single"]],
                         "ddp_ms_all": [1e3 * t for t in times["ddp"]]}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res))
    ddp.exit_rank(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--digits", type=int, default=1024, help="training digits a block trains on (one pass)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_ddp.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.repeats, a.digits, a.worker)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(a.out).with_suffix(".raw.json")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT / "src"))
    load0 = os.getloadavg()
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                    "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--repeats", str(a.repeats),
                    "--digits", str(a.digits), "--worker", str(tmp)], env=env, check=True)
    cases = json.loads(tmp.read_text())
    tmp.unlink()
    import torch
    result = {"benchmark": "bench_ddp", "ranks": 2, "repeats": a.repeats, "digits": a.digits,
              "cases": cases, "wall_seconds": round(time.time() - t0, 1),
              "loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "machine": platform.machine(),
              "note": "2 ranks share this machine's cores; ratio > 1 means data-parallel is slower"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, c in cases.items():
        print(f"{name:20s} single {c['single_ms_per_step']:7.2f} ms/step   2 ranks {c['ddp_ms_per_step']:7.2f} "
              f"ms/step   ratio {c['ratio_ddp_over_single']:.2f}   (max |W diff| {c['max_weight_difference_after']:.1e})")
    print(f"load average before/after: {load0[0]:.1f} / {result['loadavg_after'][0]:.1f}")


if __name__ == "__main__":
    main()
