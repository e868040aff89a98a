"""Run the ladder, then store, print and plot it."""
import sys
from pathlib import Path

import numpy as np
import torch

from ..engine.train import environment, prepare_out
from ..store import add_run, recorded_run
from .ladder import RUNGS, format_table, ladder_rows, run_ladder


def run_and_report(rungs, seeds, out, resume, jobs, smoke, source, log=None, engine=None) -> dict:
    log = log or (lambda line: print(line, flush=True))
    out = prepare_out(out)
    runs = run_ladder(rungs, seeds, out, resume, jobs, smoke, source, log=log, engine=engine)
    ordered = {r: runs[r] for r in sorted(runs, key=list(RUNGS).index)}
    rows = ladder_rows(ordered)
    env = environment()
    for r, (cfg, res) in ordered.items():
        s = res.summary()
        # a diverged rung is as final as a finished one (its checkpoint says so): recorded once too
        if recorded_run(out, "ladder", s["config_digest"], res.status) is None:
            add_run(out, "ladder", cfg.name, res.status, res.config, s, res.history, env)
        if res.status != "finished":
            print(f"backproplab: rung {r}: {res.message}", file=sys.stderr)
    log(format_table(rows))
    plots = make_plots(ordered, rows, out / "ladder", source)
    for p in plots:
        log(f"wrote {p}")
    return {"rungs": rows, "plots": [str(p) for p in plots], "seeds": seeds}


def make_plots(ordered, rows, folder: Path, source) -> list:
    from ..data import load_dataset
    from ..engine.evaluate import predict
    from ..report import plots
    folder.mkdir(parents=True, exist_ok=True)
    made = [plots.ladder_errors(rows, folder / "test_error_per_rung.png")]
    curves = {}
    for r, (cfg, res) in ordered.items():
        px = np.array([h["pass"] for h in res.history])
        vals = np.array([[h["test"][k]["error"] for h in res.history] for k in range(len(res.final))])
        curves[f"rung {r}"] = (px, vals)
    made.append(plots.learning_curves(curves, folder / "learning_curves.png"))
    last = list(ordered)[-1]
    cfg, res = ordered[last]
    data = load_dataset(source, cfg.data.n_train, cfg.data.n_test)
    out = predict(cfg.model, res.params[0], data.test_x)
    pred = out.argmax(1)
    wrong = torch.nonzero(pred != data.test_labels).flatten()[:96]
    made.append(plots.digit_grid(data.test_x[wrong, 0].numpy(), data.test_labels[wrong].numpy(),
                                 pred[wrong].numpy(), folder / f"misclassified_rung{last}.png",
                                 f"rung {last}, seed {res.seeds[0]}: {int((pred != data.test_labels).sum())} "
                                 f"misclassified test digits (predicted/true)"))
    return [p for p in made if p is not None]
