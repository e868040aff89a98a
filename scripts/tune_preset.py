"""Choose a preset's tuned values on a validation split, never on the test set.

    python scripts/tune_preset.py PRESET [--seeds 4] [--val 1000] [--out FILE.json]

PRESET is one with a search below (speedrun, modern, rung6, rung7). Coordinate search from the
values the preset had before it was tuned here: each knob in turn over a small grid, the
others held at their current best; every candidate is a population of `--seeds` seeds
trained on the first 7,291 - val canonical training digits and judged by mean validation
error (ties: the current value stays). The test set is never read (the runs evaluate it,
and this script drops it). Prints one line per candidate and the chosen values as
overrides; the README and the presets' docstrings quote them.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.data import load_dataset  # noqa: E402
from backproplab.engine.train import train  # noqa: E402

# preset: (knob, candidates as overrides) in the order they are searched, and the starting point
# of the search (the values before they were tuned on validation). The ladder's other values are
# the reference recipe's (rung 1b's rate was chosen on held-out training digits; see its docstring).
SEARCH = {
    "speedrun": ([
        ("optim.lr", ["0.01", "0.02", "0.04"]),
        ("train.passes", ["20", "30", "40"]),
        ("train.batch", ["64", "128", "256"]),
        ("label_smoothing", ["+method=label_smoothing:eps=0.0", "+method=label_smoothing:eps=0.1",
                             "+method=label_smoothing:eps=0.2"]),
        ("warmup", ["+method=warmup:frac=0.05", "+method=warmup:frac=0.1", "+method=warmup:frac=0.2"]),
    ], {"optim.lr": "0.02", "train.passes": "30", "train.batch": "128",
        "label_smoothing": "+method=label_smoothing:eps=0.1", "warmup": "+method=warmup:frac=0.1"}),
    # the rung-5 recipe in minibatches of 32: its peak rate (per-example rung 5 runs at 3e-4)
    "modern": ([("optim.lr", ["0.0015", "0.003", "0.006", "0.012", "0.024"])], {"optim.lr": "0.003"}),
    # the micro-ViT in minibatches of 32: its peak rate
    "rung6": ([("optim.lr", ["0.001", "0.002", "0.004"])], {"optim.lr": "0.002"}),
    # rung 7, "2026": the rung-5 recipe in minibatches (the modern preset, its rate tuned above) with
    # the best of the 2023-2026 optimizers, each at its papers' rate scale (Lion 3-10x below AdamW,
    # Muon's 2-D rate about 0.02, Schedule-Free near AdamW's), then any of the registered methods that
    # lowers validation error on top of it. "none" keeps the knob off.
    "rung7": ([
        ("optimizer", ["adamw optim.lr=0.006", "+method=lion optim.lr=0.0006", "+method=lion optim.lr=0.0015",
                       "+method=muon optim.lr=0.01", "+method=muon optim.lr=0.02",
                       "+method=schedule_free optim.lr=0.003 optim.lr_end=none",
                       "+method=schedule_free optim.lr=0.006 optim.lr_end=none"]),
        ("tta", ["none", "+method=tta"]),
        ("ema", ["none", "+method=ema"]),
        ("label_smoothing", ["none", "+method=label_smoothing:eps=0.1"]),
    ], {"optimizer": "adamw optim.lr=0.006", "tta": "none", "ema": "none", "label_smoothing": "none"}, "modern"),
}


def item(knob, value):
    """A candidate as overrides: 'none' (the knob off), '+method=...' and 'key=value' words, or a bare
    value of the knob's config key; 'adamw' names the base's own optimizer (no override)."""
    words = [w for w in value.split() if w not in ("none", "adamw")]
    return [w if (w.startswith("+method=") or "=" in w) else f"{knob}={w}" for w in words]


def overrides(choice):
    return [o for k, v in choice.items() for o in item(k, v)]


def val_error(name, choice, seeds, val, data):
    over = overrides(choice) + [f"data.val={val}", f"train.seeds={seeds}"]
    cfg = apply_overrides(preset(name), over)
    cfg.train.eval_every = cfg.train.passes
    errs = [f["val_error"] for f in train(cfg, data=data).final]
    return float(np.mean(errs)), float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("preset", choices=sorted(SEARCH))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist10k")
    grid, start, *base = SEARCH[a.preset]
    base = base[0] if base else a.preset  # the preset the search starts from
    best, rows = dict(start), []
    cache = {}
    for knob, values in grid:
        scores = {}
        for v in values:
            choice = {**best, knob: v}
            key = json.dumps(choice, sort_keys=True)
            if key not in cache:
                cache[key] = val_error(base, choice, a.seeds, a.val, data)
            scores[v] = cache[key]
            rows.append({"knob": knob, "value": v, "val_error": scores[v][0], "val_error_std": scores[v][1]})
            print(f"{knob:>16} = {v:<34} validation error {scores[v][0]:.2f} +- {scores[v][1]:.2f} %", flush=True)
        lowest = min(scores, key=lambda v: scores[v][0])
        if scores[lowest][0] < scores[best[knob]][0]:
            best[knob] = lowest
    chosen = overrides(best)
    print("chosen:", " ".join(chosen))
    out = {"preset": a.preset, "base": base, "seeds": a.seeds, "val": a.val, "rows": rows, "chosen": chosen}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
