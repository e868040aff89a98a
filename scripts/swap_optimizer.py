"""A preset against itself with its optimizer swapped for a registered one, on a validation split.

    python scripts/swap_optimizer.py [--preset rung7] [--method adopt:weight_decay=0.01]
                                     [--lrs 0.003,0.006,0.012] [--seeds 4] [--val 1000] [--out FILE.json]

Every candidate (the preset as it is, then the method at each peak rate, the preset's schedule
kept) is a population of --seeds seeds (the same seeds, so the same initial weights, shifts and
dropout masks) trained on the first 7,291 - val canonical training digits and judged by its
validation error; the test set is never read (the runs evaluate it, and this script drops it).
Prints mean +- std of validation error per candidate and the difference to the preset with its
95% interval: paired over seeds (Student t on the per-seed differences) and Welch's.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.data import load_dataset  # noqa: E402
from backproplab.engine.train import train  # noqa: E402


def val_errors(name, over, seeds, val, data):
    cfg = apply_overrides(preset(name), over + [f"data.val={val}", f"train.seeds={seeds}"])
    cfg.train.eval_every = cfg.train.passes
    r = train(cfg, data=data)
    return [float(f["val_error"]) for f in r.final], r.path


def compare(a, b):
    """a - b: mean, paired 95% interval (same seeds), Welch's 95% interval."""
    a, b = np.asarray(a), np.asarray(b)
    d = a - b
    n = len(d)
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n))
    va, vb = a.var(ddof=1) / n, b.var(ddof=1) / n
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
    welch = float(stats.t.ppf(0.975, df) * np.sqrt(va + vb))
    m = float(d.mean())
    return {"diff": m, "paired_ci": [m - half, m + half], "welch_ci": [m - welch, m + welch]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="rung7")
    ap.add_argument("--method", default="adopt:weight_decay=0.01")
    ap.add_argument("--lrs", default="0.003,0.006,0.012")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.seeds < 2:
        sys.exit("error: --seeds must be at least 2 for an interval")
    torch.set_num_threads(1)
    data = load_dataset("mnist10k")
    base, path = val_errors(a.preset, [], a.seeds, a.val, data)
    rows = [{"candidate": a.preset, "path": path, "val_errors": base, "mean": float(np.mean(base)),
             "std": float(np.std(base, ddof=1))}]
    print(f"{a.preset:>36}  validation error {rows[0]['mean']:.2f} +- {rows[0]['std']:.2f} %  {base}", flush=True)
    for lr in a.lrs.split(","):
        errs, path = val_errors(a.preset, [f"+method={a.method}", f"optim.lr={lr}"], a.seeds, a.val, data)
        row = {"candidate": f"+method={a.method} optim.lr={lr}", "path": path, "val_errors": errs,
               "mean": float(np.mean(errs)), "std": float(np.std(errs, ddof=1)), "vs_preset": compare(errs, base)}
        rows.append(row)
        c = row["vs_preset"]
        print(f"{row['candidate']:>36}  validation error {row['mean']:.2f} +- {row['std']:.2f} %  {errs}  "
              f"diff {c['diff']:+.2f} paired 95% [{c['paired_ci'][0]:+.2f}, {c['paired_ci'][1]:+.2f}] "
              f"Welch [{c['welch_ci'][0]:+.2f}, {c['welch_ci'][1]:+.2f}]", flush=True)
    out = {"preset": a.preset, "method": a.method, "seeds": a.seeds, "val": a.val, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
