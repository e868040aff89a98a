"""Variants of the diagonal SSM (models/ssm.py), judged on a validation split, never on the test set.

    python scripts/ssm_variants.py [--variants a,b,...] [--seeds 2] [--n-train 3000] [--val 1000]
                                   [--passes 3] [--out FILE.json]

Each variant is the `ssm` preset with some SSMNet options (initialization, input bias, final
norm, the A parameters' learning-rate factor) and some config overrides; every variant trains
`--seeds` seeds on the first n_train - val canonical training digits and is judged by the mean
error on the last `val` of them. The test split is cut to 100 digits and dropped from the output.
VARIANTS below are the atoms; a variant "a+b" combines atoms (later ones win).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.engine.train import train  # noqa: E402
from backproplab.models import registry  # noqa: E402
from backproplab.models.ssm import SSMNet  # noqa: E402

# Every variant starts from the preset as it was before this search (BASE: LRU ring 0.9-0.999, phases
# up to pi/8, dim 24, 28 states, lr 3e-3, dropout 0.1) and adds its atoms; "preset" is today's preset as is.
BASE = ({"init": "lru", "states": 28}, ["model.dim=24", "optim.lr=0.003", "model.dropout=0.1"])
# name: (SSMNet options, config overrides)
VARIANTS = {
    "baseline": ({}, []),
    "enc_bias": ({"enc_bias": True}, []),
    "phase_2pi": ({"max_phase": 2 * np.pi}, []),
    "s4d_lin": ({"init": "s4d"}, []),
    "final_norm": ({"final_norm": True}, []),
    "a_lr_0.3": ({"a_lr": 0.3}, []),
    "a_lr_0.1": ({"a_lr": 0.1}, []),
    "r_min_0.5": ({"r_min": 0.5}, []),
    "r_min_0.99": ({"r_min": 0.99}, []),
    "lr_1e-2": ({}, ["optim.lr=0.01"]),
    "lr_2e-2": ({}, ["optim.lr=0.02"]),
    "lr_4e-2": ({}, ["optim.lr=0.04"]),
    "no_dropout": ({}, ["model.dropout=0.0"]),
    "glu": ({"glu": True, "states": 24}, []),          # GELU -> linear H -> 2 H -> GLU; 24 states keep ~9.7k
    "r_min_0.95": ({"r_min": 0.95}, []),
    "wide": ({"states": 18}, ["model.dim=32"]),          # 32 channels, 18 states: 9,610 parameters
    "wider": ({"states": 12}, ["model.dim=40"]),         # 40 channels, 12 states: 9,770 parameters
    "net1989": ({}, ["model.name=net1989", "model.act=relu"]),   # the study's convnet on the same recipe
}


def combine(name):
    """'a+b+...': the atoms' options and overrides merged (later atoms win)."""
    if name == "preset":
        return {}, []
    opts, overrides = dict(BASE[0]), list(BASE[1])
    for atom in name.split("+"):
        if atom not in VARIANTS:
            raise KeyError(atom)
        opts.update(VARIANTS[atom][0])
        overrides += VARIANTS[atom][1]
    return opts, overrides


def run_variant(name, opts, overrides, seeds, n_train, val, passes):
    cfg = apply_overrides(preset("ssm"), overrides + [f"data.n_train={n_train}", f"data.val={val}", "data.n_test=100",
                                                      f"train.passes={passes}", f"train.seeds={seeds}",
                                                      "train.eval_every=1000", "train.eval_train=False"])
    m = cfg.model
    registry.MODELS["ssm"] = lambda mc, seed: SSMNet(seed, dim=mc.dim, depth=mc.depth, dropout=mc.dropout,
                                                     permuted=mc.seq == "permuted", **opts)
    t = time.time()
    res = train(cfg)
    val_err = np.array([f["val_error"] for f in res.final])
    return {"variant": name, "options": {k: float(v) if isinstance(v, float) else v for k, v in opts.items()},
            "overrides": overrides, "seeds": seeds, "n_train": n_train - val, "val": val, "passes": passes,
            "params": sum(p.numel() for p in registry.build_model(m, 0).parameters()),
            "val_error": float(val_err.mean()), "val_error_std": float(val_err.std(ddof=1)) if seeds > 1 else 0.0,
            "per_seed": val_err.tolist(), "seconds": round(time.time() - t, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/ssm_variants.py")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",")]
    bad = [a for v in names for a in v.split("+") if a not in VARIANTS and v != "preset"]
    if bad or a.val >= a.n_train or a.seeds < 1:
        print(f"error: unknown variant(s) {', '.join(bad)} or --val >= --n-train" if bad
              else "error: --val must be < --n-train and --seeds >= 1", file=sys.stderr)
        return 2
    rows = []
    for v in names:
        r = run_variant(v, *combine(v), a.seeds, a.n_train, a.val, a.passes)
        rows.append(r)
        print(f"{v:24s} val {r['val_error']:6.2f} +- {r['val_error_std']:.2f}%  {r['per_seed']}  ({r['seconds']:.0f} s)",
              flush=True)
    if a.out:
        prev = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else []
        Path(a.out).write_text(json.dumps(prev + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
