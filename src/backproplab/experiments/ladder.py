"""Time travel: the 1989 -> 2022 ladder of cumulative changes, every rung on several seeds.

Each rung is a preset config run as one population (all seeds at once); rungs run in
parallel worker processes. Finished rungs are found by their checkpoints and never re-run
with --resume, and a rung already recorded in the store is not recorded twice.
"""
import numpy as np

from ..config import preset, validate
from ..errors import UserError
from .costs import cost_1989_days, training_flops
from .pool import run_configs

RUNGS = {  # id -> (preset, what changed)
    "1": ("rung1", "1989 baseline: tanh, MSE on +-1, SGD 0.03 per example"),
    "1b": ("rung1b", "paper's optimizer: diagonal Levenberg-Marquardt, 1.7159 tanh(2x/3)"),
    "2": ("rung2", "no output tanh; softmax cross-entropy (SGD 0.01)"),
    "3": ("rung3", "AdamW 3e-4 -> 1e-4 linearly; 46 passes"),
    "4": ("rung4", "shifts of up to 1 pixel (-1 fill); 60 passes"),
    "5": ("rung5", "dropout 0.25 before H3; ReLU everywhere; 80 passes"),
    "6": ("rung6", "micro-ViT matched in parameters and MACs; rung-5 recipe"),
    "7": ("rung7", "2026: rung 5 in minibatches of 32 + tta + ema, chosen on validation (AdamW beat Lion, "
                   "Muon, Schedule-Free)"),
}
DEFAULT_RUNGS = ("1", "2", "3", "4", "5")


def parse_rungs(text: str | None) -> list[str]:
    if not text:
        return list(DEFAULT_RUNGS)
    ids = [t.strip() for t in text.split(",") if t.strip()]
    bad = [i for i in ids if i not in RUNGS]
    if bad or not ids:
        raise UserError(f"unknown rung {', '.join(bad) or repr(text)}; known: {', '.join(RUNGS)}")
    return ids


def rung_config(rung: str, seeds: int, smoke: bool = False, source: str = "mnist10k", seed: int = 0,
                engine: str | None = None):
    cfg = preset(RUNGS[rung][0])
    if engine and cfg.train.engine != "population":  # the micro-ViT rung always trains in minibatches
        cfg.train.engine = engine
    cfg.train.seeds, cfg.train.seed, cfg.data.source = seeds, seed, source
    if smoke:  # test size: 300 training and 200 test digits, 2 passes
        cfg.name += "-smoke"
        cfg.data.n_train, cfg.data.n_test, cfg.train.passes = 300, 200, 2
    return cfg


def run_ladder(rungs, seeds=4, out=None, resume=False, jobs=2, smoke=False, source="mnist10k", log=print,
               engine=None):
    """-> {rung: (Config, Result)}; rungs run longest first, `jobs` at a time."""
    cfgs = {r: validate(rung_config(r, seeds, smoke, source, engine=engine)) for r in rungs}
    log(f"ladder: rungs {', '.join(rungs)}, {seeds} seeds each, {jobs} at a time")
    results = run_configs(cfgs, out, resume, jobs, log,
                          lambda r, res: f"rung {r} done: test error {_mean_std(res, 'test_error')} "
                                         f"in {res.seconds:.1f} s", label="ladder rungs")
    return {r: (cfgs[r], results[r]) for r in rungs}


def _mean_std(res, key):
    v = np.array([f[key] for f in res.final], dtype=float)
    return f"{v.mean():.2f}%" + (f" +- {v.std(ddof=1):.2f}" if len(v) > 1 else "")


def ladder_rows(runs) -> list[dict]:
    rows = []
    for r, (cfg, res) in runs.items():
        n = res.n_train
        te = np.array([f["test_error"] for f in res.final])
        rows.append({
            "rung": r, "change": RUNGS[r][1], "passes": cfg.train.passes, "seeds": len(res.final),
            "status": res.status,
            "test_error": float(te.mean()), "test_error_std": float(te.std(ddof=1)) if len(te) > 1 else 0.0,
            "test_misses": float(np.mean([f["test_misses"] for f in res.final])),
            "train_error": float(np.mean([f["train_error"] for f in res.final])),
            "seconds": res.seconds, "train_flops": training_flops(cfg, n),
            "cost_1989_days": cost_1989_days(cfg, n),
            "weights_sha256": [f["weights_sha256"] for f in res.final],
        })
    return rows


def format_table(rows) -> str:
    from ..report.console import render, table
    cols = ["rung", "what changed"] + [(c, "right") for c in ("passes", "test error", "misses", "train err",
                                                              "seconds", "FLOPs", "1989 days")]
    return render(table(cols, [[w["rung"], w["change"], str(w["passes"]),
                                f"{w['test_error']:.2f}% +- {w['test_error_std']:.2f}", f"{w['test_misses']:.1f}",
                                f"{w['train_error']:.2f}%", f"{w['seconds']:.1f}", f"{w['train_flops']:.2e}",
                                f"{w['cost_1989_days']:.1f}"] for w in rows]))
