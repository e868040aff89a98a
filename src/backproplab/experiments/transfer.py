"""Transfer and forgetting with the 1989 net on the population engine (modern recipe).

Transfer. A source task pre-trains the net (every seed its own replica); the target task then
fine-tunes it with nothing, H1 or H1 + H2 frozen, against the same net trained from scratch on
the same target digits:
  fashion   Fashion-MNIST (Debian's dataset-fashion-mnist, the first 7,291 training images, the
            1989 preprocessing) -> the 1989 digits (all ten classes)
  digits04  the 1989 training digits 0-4 -> digits 5-9 (trained and tested on 5-9 only)
H1, H2 and H3 are copied from the pre-trained net; the output layer starts from the target
run's own init (a new task's head). Frozen layers are restored after every step (their
optimizer moments move, their weights do not), so they stay exactly the pre-trained ones.
Fractions: the first round(f n) target training digits (the canonical order is a random
permutation), the same digits for every arm and seed (a paired design). A small fraction
gets more passes (at least MIN_STEPS steps) so that every run makes a real number of steps;
the arms of one fraction always share the budget.

Continual learning. Task A (digits 0-4), then task B (digits 5-9) from A's weights (the ten
output units shared: A's five keep their trained rows), with and without Learning without Forgetting (the registered method lwf over A's units 0-4).
Forgetting of A: A's test error after B minus after A, both task-aware (argmax over A's five
units) and class-incremental (argmax over all ten).
"""
import math
from pathlib import Path

import numpy as np
import torch

from ..config import apply_overrides, preset
from ..data import load_dataset
from ..engine.population import Population, train_passes
from ..errors import UserError
from .effects import welch

FASHION = Path("/usr/share/datasets/fashion-mnist")
LAYERS = {"h1": ("h1_w", "h1_b"), "h2": ("h2_w", "h2_b"), "h3": ("h3_w", "h3_b"), "out": ("out_w", "out_b")}
SOURCES = ("fashion", "digits04")
MIN_STEPS = 400
HEAD = LAYERS["out"]


def parse_arms(text: str) -> list[tuple[str, tuple]]:
    """'none,h1,h1+h2' -> [('none', ()), ('h1', ('h1',)), ('h1+h2', ('h1', 'h2'))]."""
    arms = []
    for tok in [t.strip() for t in text.split(",") if t.strip()]:
        layers = () if tok == "none" else tuple(p.strip() for p in tok.split("+"))
        for ly in layers:
            if ly not in LAYERS:
                raise UserError(f"--freeze {tok}: net1989 has no layer {ly!r} (its layers: {', '.join(LAYERS)})")
        if "out" in layers:
            raise UserError(f"--freeze {tok}: the output layer is the new task's and always trains")
        arms.append((tok, layers))
    if not arms:
        raise UserError("--freeze: give at least one arm (none, h1, h1+h2, ...)")
    return arms


def parse_fractions(text: str) -> list[float]:
    try:
        fr = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--fractions {text!r}: expected numbers like 0.01,0.1,1") from None
    bad = [f for f in fr if not 0 < f <= 1]
    if not fr or bad:
        raise UserError(f"--fractions {text!r}: each fraction must be in (0, 1]")
    return fr


class FrozenPopulation(Population):
    """The population engine with some parameters held fixed: restored after every step."""

    frozen: tuple = ()

    def hold(self, names):
        self.frozen = tuple(names)
        self._held = {n: self.views[n].detach().clone() for n in self.frozen}

    def _step(self, *a, **k):
        super()._step(*a, **k)
        if self.frozen:
            with torch.no_grad():
                for n in self.frozen:
                    self.views[n].copy_(self._held[n])


def recipe(passes: int, seeds: int, methods=()):
    """The modern preset (ReLU, AdamW, cross-entropy, batch 32, shifts, dropout) for `passes`;
    methods: '+method=...' items."""
    return apply_overrides(preset("modern"), [f"train.passes={passes}", f"train.seeds={seeds}", *methods])


def start_from(eng, init, new_head=True) -> None:
    """The population's weights become init (R, P); with new_head, the output layer keeps the
    population's own fresh init."""
    fresh = {n: eng.views[n].detach().clone() for n in HEAD}
    with torch.no_grad():
        eng.W.copy_(init)
        for n in HEAD if new_head else ():
            eng.views[n].copy_(fresh[n])


def fit(x, labels, passes: int, seeds: list, init=None, frozen=(), methods=(), new_head=True) -> FrozenPopulation:
    """Train a population on (x (n, 1, 16, 16), labels) as engine/train.train does (the pass's
    shifts and dropout masks from the shared streams); init (R, P) weights to start from (with
    new_head, their output layer replaced by the fresh init); `frozen` parameter names held fixed."""
    cfg = recipe(passes, len(seeds), methods)
    eng = FrozenPopulation(cfg, seeds)
    if init is not None:
        start_from(eng, init, new_head)
    eng.hold(frozen)
    train_passes(eng, x.reshape(-1, 16, 16).numpy(), labels.numpy(), passes)
    return eng


def errors(eng, x, labels, units=None) -> np.ndarray:
    """(R,) percent test error; units: argmax over these output units only (task-aware)."""
    out = eng.outputs(x)                                               # (R, B, 10)
    if units is not None:
        u = torch.tensor(units)
        pred = u[out[..., u].argmax(-1)]
    else:
        pred = out.argmax(-1)
    return 100.0 * (pred != labels).float().mean(1).numpy()


def tasks(source: str, smoke: bool):
    """-> (source (x, labels), target train (x, labels), target test (x, labels))."""
    d = load_dataset(n_test=300 if smoke else None)
    if source == "fashion":
        if not FASHION.is_dir():
            raise UserError(f"Fashion-MNIST is not at {FASHION}: install Debian's dataset-fashion-mnist")
        f = load_dataset(str(FASHION), n_train=300 if smoke else 7291, n_test=10)
        return (f.train_x, f.train_labels), (d.train_x, d.train_labels), (d.test_x, d.test_labels)
    if source == "digits04":
        a, b = d.train_labels < 5, d.train_labels >= 5
        tb = d.test_labels >= 5
        return ((d.train_x[a], d.train_labels[a]), (d.train_x[b], d.train_labels[b]),
                (d.test_x[tb], d.test_labels[tb]))
    raise UserError(f"--from {source}: choose {' or '.join(SOURCES)}")


def _smoke_cut(t, k=300):
    return tuple(v[:k] for v in t)


def fine_passes(n: int, passes: int, batch: int = 32, min_steps: int = MIN_STEPS) -> int:
    return max(passes, math.ceil(min_steps * batch / max(n, 1)))


def run_transfer(source, arms, fractions, seeds, passes, pre_passes, smoke=False, log=print) -> list[dict]:
    seed_list = list(range(seeds))
    (sx, sl), (tx, tl), (ex, el) = tasks(source, smoke)
    if smoke:
        (sx, sl), (tx, tl) = _smoke_cut((sx, sl)), _smoke_cut((tx, tl))
    pre = fit(sx, sl, pre_passes, seed_list)
    log(f"{source}: pre-trained {pre_passes} passes on {len(sx)} images")
    rows = []
    for f in fractions:
        n = max(10, round(f * len(tx)))
        x, lab = tx[:n], tl[:n]
        p = fine_passes(n, passes, min_steps=4 if smoke else MIN_STEPS)
        errs = {"scratch": errors(fit(x, lab, p, seed_list), ex, el)}
        for name, layers in arms:
            frozen = [pn for ly in layers for pn in LAYERS[ly]]
            errs[name] = errors(fit(x, lab, p, seed_list, init=pre.W.detach().clone(), frozen=frozen), ex, el)
        for name, e in errs.items():
            d, lo, hi, _ = welch(e, errs["scratch"])
            rows.append({"source": source, "fraction": f, "n_train": n, "passes": p, "arm": name,
                         "test_error": float(e.mean()), "test_error_std": float(e.std(ddof=1)) if seeds > 1 else 0.0,
                         "minus_scratch": d, "ci_low": lo, "ci_high": hi, "per_seed": e.tolist()})
        log(f"{source} fraction {f}: " + ", ".join(f"{k} {v.mean():.2f}%" for k, v in errs.items()))
    return rows


def run_continual(seeds, passes, lam=1.0, smoke=False, log=print) -> list[dict]:
    seed_list = list(range(seeds))
    d = load_dataset(n_test=300 if smoke else None)
    tr_a, tr_b = d.train_labels < 5, d.train_labels >= 5
    te_a = d.test_labels < 5
    ax, al, bx, bl = d.train_x[tr_a], d.train_labels[tr_a], d.train_x[tr_b], d.train_labels[tr_b]
    if smoke:
        ax, al, bx, bl = ax[:150], al[:150], bx[:150], bl[:150]
    tax, tal = d.test_x[te_a], d.test_labels[te_a]
    tbx, tbl = d.test_x[~te_a], d.test_labels[~te_a]
    a = fit(ax, al, passes, seed_list)
    after_a = {"aware": errors(a, tax, tal, list(range(5))), "all": errors(a, tax, tal)}
    rows = []
    for name, methods in (("fine-tune", ()), (f"lwf (lam {lam:g}, T 2)", (f"+method=lwf:lam={lam},classes=0-4",))):
        b = fit(bx, bl, passes, seed_list, init=a.W.detach().clone(), methods=methods, new_head=False)
        fa, fall = errors(b, tax, tal, list(range(5))), errors(b, tax, tal)
        eb = errors(b, tbx, tbl, list(range(5, 10)))
        rows.append({"arm": name, "seeds": seeds, "passes": passes,
                     "A_error_after_A": float(after_a["aware"].mean()), "A_error_after_B": float(fa.mean()),
                     "forgetting": float((fa - after_a["aware"]).mean()),
                     "forgetting_std": float((fa - after_a["aware"]).std(ddof=1)) if seeds > 1 else 0.0,
                     "forgetting_all_units": float((fall - after_a["all"]).mean()),
                     "B_error": float(eb.mean()), "per_seed_forgetting": (fa - after_a["aware"]).tolist()})
        log(f"continual {name}: forgetting {rows[-1]['forgetting']:.2f} points, B error {eb.mean():.2f}%")
    if len(rows) == 2:
        d_, lo, hi, _ = welch(rows[1]["per_seed_forgetting"], rows[0]["per_seed_forgetting"])
        rows[1].update(minus_finetune=d_, ci_low=lo, ci_high=hi)
    return rows
