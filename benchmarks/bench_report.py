"""How long `backproplab report` takes and how big its page is (issue target: <= 10 s, < 5 MB from a
store holding the full ladder, an effects run and a scaling study).

    python benchmarks/bench_report.py [--store DIR ...] [--repeats 3]

Without --store it first makes a smoke-size store in a temporary folder (repro --preset smoke,
ladder --smoke, effects --smoke, scale run --smoke: the commands' own records). Measured:
  cold   `backproplab report` in a fresh process, wall and CPU seconds (imports included: torch,
         matplotlib, the engines), once;
  warm   build_report() in this process, median of --repeats, wall and CPU seconds, and the
         median seconds of each section;
  read   reading the stores alone (the floor every build pays), median, for the ratio.
CPU seconds are printed beside wall seconds because this machine is shared: wall time grows
with the load average (printed too), the process's own CPU time much less. The last line is
one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_smoke_store(folder: str) -> str:
    import contextlib
    import io

    from backproplab.cli import main
    for argv in (["repro", "--preset", "smoke", "--seeds", "2", "--quiet"], ["ladder", "--smoke", "--jobs", "1"],
                 ["effects", "--smoke"], ["scale", "run", "--smoke", "--jobs", "1"]):
        with contextlib.redirect_stdout(io.StringIO()):
            if main(argv + ["--out", folder]) != 0:
                raise SystemExit(f"making the store: {' '.join(argv)} failed")
    return folder


def cold(stores, out) -> dict:
    args = [sys.executable, "-m", "backproplab", "report", "--out", out, "--json"]
    for s in stores:
        args += ["--store", s]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0, c0 = time.perf_counter(), os.times()
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    t1, c1 = time.perf_counter(), os.times()
    if p.returncode != 0:
        raise SystemExit(f"backproplab report failed: {p.stderr.strip()}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return {"wall_s": t1 - t0, "cpu_s": cpu, "bytes": res["bytes"], "sections": res["sections"],
            "tables": res["tables"], "figures": res["figures"], "runs": res["runs"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", action="append", help="a results store to report on (repeat); default: a smoke store")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_report.")
    stores = a.store or [make_smoke_store(str(Path(tmp) / "store"))]
    load0 = os.getloadavg()[0]
    c = cold(stores, str(Path(tmp) / "cold"))
    from backproplab.report.collect import Context
    from backproplab.report.html import build_report
    build_report(stores, Path(tmp) / "warm")      # imports and first-use costs out of the repeats
    walls, cpus, secs, reads = [], [], {}, []
    for i in range(a.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = build_report(stores, Path(tmp) / "warm")
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        for k, v in res["section_seconds"].items():
            secs.setdefault(k, []).append(v)
        t0 = time.perf_counter()
        Context.load(stores)
        reads.append(time.perf_counter() - t0)
    load1 = os.getloadavg()[0]
    warm, read = statistics.median(walls), statistics.median(reads)
    out = {"stores": stores, "runs": c["runs"], "sections": c["sections"], "tables": c["tables"],
           "figures": c["figures"], "html_bytes": c["bytes"], "cold_wall_s": round(c["wall_s"], 2),
           "cold_cpu_s": round(c["cpu_s"], 2), "warm_wall_s_median": round(warm, 2),
           "warm_cpu_s_median": round(statistics.median(cpus), 2), "read_s_median": round(read, 3),
           "warm_over_read": round(warm / max(read, 1e-9), 1), "repeats": a.repeats,
           "section_s_median": {k: round(statistics.median(v), 2) for k, v in secs.items()},
           "load_average_1min": [round(load0, 1), round(load1, 1)], "cpus": os.cpu_count()}
    print(f"report of {out['runs']} runs from {', '.join(stores)}: {out['tables']} tables, {out['figures']} figures, "
          f"{c['bytes'] / 1e6:.2f} MB")
    print(f"cold (fresh process, imports included): {c['wall_s']:.1f} s wall, {c['cpu_s']:.1f} s CPU")
    print(f"warm (median of {a.repeats}): {warm:.1f} s wall, {out['warm_cpu_s_median']:.1f} s CPU; reading the "
          f"stores alone {read:.3f} s ({out['warm_over_read']}x)")
    print("sections (median s): " + ", ".join(f"{k} {v}" for k, v in out["section_s_median"].items()))
    print(f"load average (1 min) {load0:.1f} before, {load1:.1f} after, on {os.cpu_count()} CPUs")
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
