"""Digits as 256-pixel sequences: the diagonal SSM (in order and permuted) against a tiny
transformer on the same pixel sequence and the 1989 convnet, all at about 10k parameters,
each on the same recipe (the `ssm` preset's: AdamW lr 2e-2 -> 1e-4, cross-entropy, batch 32,
no shifts, no dropout) and the same passes, n seeds, validation split data.val carved from the training set.

  python -m backproplab.experiments.sequence --seeds 2 --passes 3 --n-train 3000 --out DIR [--json] [--smoke]

The default trains on the first 3,000 training digits (2,500 after the last 500 are held
out): the SSM costs about 2.9 M multiply-adds an image and the pixel transformer 5.9 M, 46 and
93 times the convnet, and the study has to fit beside others on two shared cores.

Each model's error (validation and test, mean and spread over seeds), training seconds, and
the difference from the convnet with its 95% CI (Welch). The transformer is models/vit.py
with patch 1 (each pixel a token, 256 + 3 tokens, learned position embeddings: the order
of the pixels is a relabelling of its positions, so it is run in order only).
"""
import argparse
import sys

import numpy as np

from ..config import apply_overrides, preset
from ..errors import UserError
from ..report.progress import ProgressBar
from ..jsonout import emit_json
from .effects import welch

MODELS = {
    "ssm (in order)": ["model.name=ssm"],
    "ssm (permuted)": ["model.name=ssm", "model.seq=permuted"],
    "transformer (pixels)": ["model.name=vit", "model.dim=16", "model.depth=2", "model.heads=2", "model.patch=1"],
    "convnet (net1989)": ["model.name=net1989", "model.act=relu"],
}
BASE = "convnet (net1989)"


def configs(seeds: int, passes: int, smoke: bool, n_train: int = 3000, val: int = 500) -> dict:
    """n_train: the first n training digits (the last `val` of them held out for validation)."""
    n_train, val = (200, 50) if smoke else (n_train, val)
    extra = [f"data.n_train={n_train}"] + (["data.n_test=100"] if smoke else [])
    return {k: apply_overrides(preset("ssm"), v + extra + [f"train.passes={passes}", f"train.seeds={seeds}",
                                                         f"data.val={val}", "train.eval_every=1000"])
            for k, v in MODELS.items()}


def run(seeds: int, passes: int, out, smoke: bool = False, n_train: int = 3000, log=print, models=None) -> list[dict]:
    """models: the MODELS keys to run (default all); a model whose run is checkpointed in `out` as
    finished is read back, a stopped one continues (train(resume=True))."""
    from ..engine.train import train
    from ..models.registry import model_card
    rows, errs = [], {}
    for name, cfg in configs(seeds, passes, smoke, n_train).items():
        if models is not None and name not in models and name != BASE:
            continue
        res = train(cfg, out=out, resume=True, progress=ProgressBar(cfg.train.passes, label=f"{name}: pass"))
        val = np.array([f["val_error"] for f in res.final])
        test = np.array([f["test_error"] for f in res.final])
        errs[name] = (val, test)
        card = model_card(cfg.model)
        rows.append({"model": name, "params": card["params"], "macs": card["macs"], "seeds": seeds,
                     "passes": passes, "val_error": float(val.mean()), "val_error_std": float(val.std(ddof=1)) if seeds > 1 else 0.0,
                     "test_error": float(test.mean()), "test_error_std": float(test.std(ddof=1)) if seeds > 1 else 0.0,
                     "seconds": round(res.seconds, 1), "status": res.status})
        log(f"{name}: val {val.mean():.2f}% test {test.mean():.2f}% ({res.seconds:.0f} s)")
    for r in rows:
        d, lo, hi, _ = welch(errs[r["model"]][1], errs[BASE][1])
        r.update(test_minus_convnet=d, ci_low=lo, ci_high=hi)
    return rows


def table(rows) -> str:
    from ..report.console import render, table as rich_table
    cols = ["model"] + [(c, "right") for c in ("params", "MACs", "val error", "test error", "test - convnet [95% CI]",
                                               "train s")]
    return render(rich_table(cols, [[r["model"], str(r["params"]), str(r["macs"]),
                                     f"{r['val_error']:.2f} +- {r['val_error_std']:.2f}%",
                                     f"{r['test_error']:.2f} +- {r['test_error_std']:.2f}%",
                                     f"{r['test_minus_convnet']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
                                     f"{r['seconds']:.0f}"] for r in rows]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backproplab.experiments.sequence")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=3000, help="first n training digits, 500 of them for validation")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)} (the convnet always runs)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.seeds < 2 or a.passes < 1:
            raise UserError("--seeds must be >= 2 (a spread and a CI) and --passes >= 1")
        models = None if a.models is None else [m.strip() for m in a.models.split(",")]
        bad = [m for m in models or () if m not in MODELS]
        if bad:
            raise UserError(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
        rows = run(a.seeds, a.passes, a.out, a.smoke, a.n_train, models=models)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if a.json:
        emit_json({"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
