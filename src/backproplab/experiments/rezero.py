"""The ReZero study at small scale: does x + a*F(x) (a = 0 at init) let deep residual stacks
train without normalization, and do they converge faster?

For each stack (mlp, conv), depth and block variant (models/deep.py) the seeds are the
replicas of one population on the engine (engine/population.py, model.name=deep): the
registry's Adam (+method=adam, torch's defaults) at a fixed learning rate, no schedule, no
warm-up, no clipping, a fixed budget of steps. Each step is Population.train_batch on the
batches the study draws: replica k takes the minibatches of seed k's own stream, the same
for every variant of that seed (uniform with replacement). Recorded per run (= replica):
  final loss        cross-entropy on a fixed subset of the training digits after the last step
  steps to target   first step at which the mean of the last WINDOW minibatch losses (the
                    engine's loss of each batch before its step) is <= target
  test error        on a fixed subset of the test digits after the last step
  diverged          a non-finite minibatch loss (its losses stop there; the other replicas go on)
Nothing is chosen on any of these: the rate, budgets and targets are fixed in advance.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.deep import KINDS, NORMS, stack_macs

WINDOW = 10          # minibatch losses averaged for the steps-to-target test
N_EVAL = 512         # training digits for the final loss, test digits for the test error
# Per stack: width, batch, default step budget, target loss. The conv stack runs at 8x8 with
# width 8 so that depth 128 stays affordable on one core.
STACKS = {"mlp": dict(width=64, batch=64, steps=300, target=0.5),
          "conv": dict(width=8, batch=32, steps=150, target=0.5)}
DEFAULT_DEPTHS = (8, 32, 64, 128)
MAX_DEPTH = 256      # the config's model.depth range
LR = 1e-3


def parse_ints(text, what, lo=1, hi=MAX_DEPTH):
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected comma-separated integers") from None
    if not vals or any(not lo <= v <= hi for v in vals):
        raise UserError(f"--{what} {text!r}: each value must be in {lo}..{hi}")
    return vals


def parse_names(text, known, what):
    vals = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [v for v in vals if v not in known]
    if bad or not vals:
        raise UserError(f"--{what}: unknown {', '.join(bad) or repr(text)}; choose from {', '.join(known)}")
    return vals


def cell_config(kind, depth, norm, seeds, width, batch, lr=LR):
    """The engine config of one cell: model.name=deep with the cell's stack, depth, width and
    block; the registry's Adam at `lr`, constant; no shifts, no dropout, no weight decay."""
    from ..config import apply_overrides, preset
    cfg = apply_overrides(preset("modern"), [
        "model.name=deep", f"model.stack={kind}", f"model.depth={depth}", f"model.width={width}",
        f"model.norm={norm}", "model.dropout=0", "train.shift=0", f"train.batch={batch}",
        f"train.seeds={len(seeds)}", f"train.seed={min(seeds)}", f"optim.lr={lr}", "optim.lr_end=none",
        "optim.weight_decay=0", "+method=adam"])
    cfg.name = f"rezero-{kind}{depth}-{norm}"
    return cfg


def seed_batches(seed, n, batch, steps) -> torch.Tensor:
    """(steps, batch) indices into the n training digits from seed's own stream: the variant
    does not enter, so every variant of a seed sees the same minibatches."""
    g = torch.Generator().manual_seed(10_000 + int(seed))
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for _ in range(steps)])


def run_cell(data, kind, depth, norm, seeds, steps, width, batch, target, lr=LR, vmap=None) -> list[dict]:
    """One (stack, depth, variant) cell: its seeds as one population on the engine -> one record
    per seed. vmap: the engine's choice by default (vmap of the stacked forward; the module loop
    for BatchNorm, whose running statistics are each module's)."""
    from ..engine.population import Population
    seeds = [int(s) for s in seeds]
    cfg = cell_config(kind, depth, norm, seeds, width, batch, lr)
    pop = Population(cfg, seeds, path="autograd", vmap=vmap)
    n, R = len(data.train_x), len(seeds)
    x, y = data.train_x.reshape(n, 1, 16, 16), data.train_labels
    idx = torch.stack([seed_batches(s, n, batch, steps) for s in seeds], 1)    # (steps, R, batch)
    losses, reached, diverged = [[] for _ in seeds], [None] * R, [False] * R
    t0 = time.process_time()
    for step in range(1, steps + 1):
        i = idx[step - 1]
        v = pop.train_batch(x[i], y[i], steps, 0, x)    # per-replica batches; (R,) losses before the step
        for r, lv in enumerate(v.tolist()):
            if diverged[r]:
                continue
            if not math.isfinite(lv):
                diverged[r] = True
                continue
            losses[r].append(lv)
            if reached[r] is None and len(losses[r]) >= WINDOW and np.mean(losses[r][-WINDOW:]) <= target:
                reached[r] = step
        if all(diverged):
            break
    cpu = time.process_time() - t0
    out_train = pop.outputs(data.train_x[:N_EVAL])                                # (R, N_EVAL, 10), eval mode
    pred = pop.outputs(data.test_x[:N_EVAL]).argmax(-1)
    runs = []
    for r, s in enumerate(seeds):
        final_loss, test_error = float("nan"), float("nan")
        if not diverged[r]:
            fl = float(F.cross_entropy(out_train[r], data.train_labels[:N_EVAL]))
            final_loss = fl if math.isfinite(fl) else float("nan")
            test_error = 100.0 * float((pred[r] != data.test_labels[:N_EVAL]).float().mean())
            diverged[r] = not math.isfinite(final_loss)
        runs.append({"stack": kind, "depth": depth, "norm": norm, "seed": s, "steps": steps,
                     "final_loss": final_loss, "test_error": test_error, "steps_to_target": reached[r],
                     "target": target, "diverged": diverged[r], "cpu_seconds": cpu / R, "cell_cpu_seconds": cpu,
                     "losses": losses[r], "rezero_a": pop.models[r].residual_weights(),
                     "macs": stack_macs(kind, depth, width), "path": pop.path,
                     "vmap": pop.vmapped, "config_digest": cfg.digest()})
    return runs


def run_one(data, kind, depth, norm, seed, steps, width, batch, target, lr=LR) -> dict:
    """One seed alone: a population of one."""
    return run_cell(data, kind, depth, norm, [seed], steps, width, batch, target, lr)[0]


def run_study(data, stacks, depths, norms, seeds, steps=None, log=print) -> list[dict]:
    runs = []
    for kind in stacks:
        p = STACKS[kind]
        for depth in depths:
            for norm in norms:
                cell = run_cell(data, kind, depth, norm, range(seeds), steps or p["steps"], p["width"], p["batch"],
                                p["target"])
                runs += cell
                for s, r in enumerate(cell):
                    log(f"{kind:4s} depth {depth:3d} {norm:10s} seed {s}: final loss {r['final_loss']:.3f}"
                        f"{' DIVERGED' if r['diverged'] else ''}, target at "
                        f"{r['steps_to_target'] if r['steps_to_target'] else '-'} "
                        f"({r['cpu_seconds']:.1f} s cpu, its share of the cell)")
    return runs


def _ms(vals):
    v = np.array([x for x in vals if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs) -> list[dict]:
    """One row per (stack, depth, norm): means and sample std over seeds."""
    rows, keys = [], []
    for r in runs:
        k = (r["stack"], r["depth"], r["norm"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rr = [r for r in runs if (r["stack"], r["depth"], r["norm"]) == k]
        fl, fs = _ms([r["final_loss"] for r in rr])
        te, ts = _ms([r["test_error"] for r in rr])
        hit = [r["steps_to_target"] for r in rr if r["steps_to_target"] is not None]
        st, ss = _ms([float(h) for h in hit])
        rows.append({"stack": k[0], "depth": k[1], "norm": k[2], "seeds": len(rr), "final_loss": fl,
                     "final_loss_std": fs, "test_error": te, "test_error_std": ts, "reached": len(hit),
                     "steps_to_target": st, "steps_to_target_std": ss, "target": rr[0]["target"],
                     "steps": rr[0]["steps"], "diverged": sum(r["diverged"] for r in rr)})
    return rows


def claims(rows) -> list[dict]:
    """The seed's two claims, per (stack, depth), read off the table:
    trains_without_norm: every ReZero seed reaches the target loss and none diverges;
    faster: ReZero's mean steps to target is below that of every variant in which all seeds got there.
    """
    out = []
    for kind, depth in sorted({(r["stack"], r["depth"]) for r in rows}, key=lambda t: (KINDS.index(t[0]), t[1])):
        by = {r["norm"]: r for r in rows if r["stack"] == kind and r["depth"] == depth}
        rz = by.get("rezero")
        if rz is None:
            continue
        ok = rz["reached"] == rz["seeds"] and rz["diverged"] == 0
        others = {n: r["steps_to_target"] for n, r in by.items() if n != "rezero" and r["reached"] == r["seeds"]}
        faster = ok and all(rz["steps_to_target"] < v for v in others.values())
        none = by.get("none")  # the residual stack without normalization: does it train at this depth?
        out.append({"stack": kind, "depth": depth, "rezero_trains": ok, "rezero_fastest": faster,
                    "none_reached": None if none is None else none["reached"],
                    "none_final_loss": None if none is None else none["final_loss"],
                    "rezero_steps": rz["steps_to_target"], "others_steps": others})
    return out


def format_table(rows) -> str:
    from ..report.console import render, table
    body = []
    for r in rows:
        fl = "diverged" if math.isnan(r["final_loss"]) else f"{r['final_loss']:.3f} +- {r['final_loss_std']:.3f}"
        te = "-" if math.isnan(r["test_error"]) else f"{r['test_error']:.1f} +- {r['test_error_std']:.1f}"
        st = (f"{r['steps_to_target']:.0f} +- {r['steps_to_target_std']:.0f}" if r["reached"] else "never") + \
            f" ({r['reached']}/{r['seeds']})"
        body.append([r["stack"], str(r["depth"]), r["norm"], fl, te, st, f"{r['diverged']}/{r['seeds']}"])
    cols = ["stack", ("depth", "right"), "block"] + [(c, "right") for c in ("final loss", "test err %",
                                                                            "steps to target", "diverged")]
    return render(table(cols, body))


def plot(rows, runs, path):
    from ..report.plots import _plt
    plt = _plt()
    if plt is None:
        return None
    kinds = [k for k in KINDS if any(r["stack"] == k for r in rows)]
    fig, axes = plt.subplots(2, len(kinds), figsize=(6 * len(kinds), 8), squeeze=False)
    for j, kind in enumerate(kinds):
        ax = axes[0][j]
        for norm in NORMS:
            rr = [r for r in rows if r["stack"] == kind and r["norm"] == norm and not math.isnan(r["final_loss"])]
            if rr:
                ax.errorbar([r["depth"] for r in rr], [r["final_loss"] for r in rr],
                            yerr=[r["final_loss_std"] for r in rr], fmt="o-", capsize=3, label=norm)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth (residual layers)")
        steps = next(r["steps"] for r in rows if r["stack"] == kind)
        ax.set_ylabel(f"training loss after {steps} steps")
        ax.set_title(f"{kind}: final loss (mean +- std; diverged runs left out)")
        ax.grid(alpha=0.3)
        ax.legend()
        deepest = max(r["depth"] for r in rows if r["stack"] == kind)
        ax = axes[1][j]
        for norm in NORMS:
            curves = [r["losses"] for r in runs if r["stack"] == kind and r["depth"] == deepest and r["norm"] == norm]
            if curves:
                n = min(len(c) for c in curves)
                if n >= WINDOW:
                    m = np.mean([np.convolve(c[:n], np.ones(WINDOW) / WINDOW, "valid") for c in curves], axis=0)
                    ax.plot(np.arange(WINDOW, n + 1), m, label=norm)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"minibatch loss (mean of {WINDOW})")
        ax.set_title(f"{kind}, depth {deepest}: training curves (seed mean)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
