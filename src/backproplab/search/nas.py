"""Architecture search over the scalable convnet family at a fixed parameter or multiply-add budget.

The space (models/convnet.py's layers, every dimension free instead of tied to one size knob):
  depth   extra same-shape layers after c2 (0-3; the family's size s has (s - 1) // 2)
  width   w: c1 has 4 w channels, c2 and the extra layers 8 w (the family's model.width)
  kernel  k x k kernels of the extra layers (3 in the family; 5 here too); c1 and c2 stay 5x5
  block   plain | separable | inverted_residual (models/convnet.BLOCKS)
An architecture with depth 0 has no extra layer, so its kernel is irrelevant: it is kept once,
with kernel 3. With kernel 3 an architecture is exactly the registered convnet
(model.depth = 2 depth + 1, model.width, model.block); with kernel 5 it is built here
(NASConvNet: the family's module with other layer specs). Parameters and multiply-adds are
counted from the layer specs (the family's formulas); the budget keeps those at or under it.

Every architecture trains on the one engine (engine/population.Population, the autograd
path): the modern recipe without dropout and shifts (AdamW, lr 6e-3 -> 1e-4 over the run,
batch 32, cross-entropy), `passes` passes over the training digits left after the validation
carve-out (data.val), validation error after every pass: the error after pass f is the
low-fidelity estimate of fidelity f. The test split is never looked at during a search.

Ground truth: the space is small enough to train exhaustively at low fidelity (table()),
once, cached in a JSON file. The search strategies then run on that table (a tabular
benchmark: a strategy's evaluation of an architecture is its table entry), each with the same
compute: a budget of architecture-trainings at a fidelity (an evaluation at fidelity f costs
f passes; an architecture already evaluated by the same search is not trained again):
  random     uniform over the space without repetition;
  evolution  regularized evolution (Real et al. 2019, "aging evolution"): a population of P,
             initialized at random; each step samples S members uniformly, the one of lowest
             validation error is the parent, its child (mutate: one dimension changed to
             another value, the child under the budget) joins, and the OLDEST member leaves;
  tpe        Optuna's TPESampler on the four dimensions as categorical choices (an
             architecture over the budget is told as failed and costs nothing).
Regret of a search = the table's validation error (at the table's fidelity) of the
architecture it returns, minus the best in the table; mean and spread over search seeds.

Zero-cost proxy: synflow (Tanaka et al. 2020), computed with autograd on the untrained net:
weights replaced by their absolute values, in float64, input all ones, R = sum of the
outputs; score = sum over every parameter theta of theta * dR/dtheta. Reported as the Spearman
rank correlation between the score and minus the trained validation error, beside the
parameter count's.
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

DIMENSIONS = {"depth": (0, 1, 2, 3), "width": (1, 2, 3, 4, 5, 6), "kernel": (3, 5),
              "block": ("plain", "separable", "inverted_residual")}
METRICS = ("params", "macs")
STRATEGIES = ("random", "evolution", "tpe")


@dataclass(frozen=True, order=True)
class Arch:
    depth: int
    width: int
    kernel: int
    block: str

    def canonical(self) -> "Arch":
        return Arch(self.depth, self.width, 3, self.block) if self.depth == 0 else self

    @property
    def key(self) -> str:
        return f"d{self.depth}-w{self.width}-k{self.kernel}-{self.block}"

    def specs(self) -> list:
        """The layer specs (models/convnet.py's format) of this architecture on 16x16 digits."""
        from ..models import convnet as cn
        w = cn.shape(self.width)[0]
        s1, s2 = cn._sides(cn.SIDE)
        specs = [dict(name="c1", cin=1, cout=w, k=5, side=s1, stride=2, pad=2, groups=1, relu=True)]
        specs += cn._block("c2", w, 2 * w, 5, s2, 2, self.block, side_in=s1)
        for i in range(self.depth):
            specs += cn._block(f"c{3 + i}", 2 * w, 2 * w, self.kernel, s2, 1, self.block, residual=True)
        specs.append(dict(name="head", cin=2 * w * s2 * s2, cout=10, k=1, side=1, stride=1, pad=0, groups=1,
                          relu=False))
        return specs

    @property
    def params(self) -> int:
        return sum(s["cin"] // s["groups"] * s["cout"] * s["k"] ** 2 + s["cout"] for s in self.specs())

    @property
    def macs(self) -> int:
        return sum(s["side"] ** 2 * s["cout"] * (s["cin"] // s["groups"]) * s["k"] ** 2 for s in self.specs())

    def cost(self, metric: str) -> int:
        return self.params if metric == "params" else self.macs

    def build(self, seed: int):
        return NASConvNet(self, seed)


def parse_space(items) -> dict:
    """['depth=0,1', 'block=plain'] -> DIMENSIONS with those dimensions narrowed."""
    dims = {k: tuple(v) for k, v in DIMENSIONS.items()}
    for item in items or ():
        name, sep, vals = item.partition("=")
        if name not in DIMENSIONS:
            raise UserError(f"unknown dimension {name!r}; known: {', '.join(DIMENSIONS)}")
        if not sep or not vals.strip():
            raise UserError(f"dimension {name} needs values, e.g. {name}="
                            f"{','.join(map(str, DIMENSIONS[name][:2]))}")
        out = []
        for v in vals.split(","):
            v = v.strip()
            val = v if name == "block" else (int(v) if v.lstrip("-").isdigit() else None)
            if val not in DIMENSIONS[name]:
                raise UserError(f"{name}={v} is not in the space; {name} takes "
                                f"{', '.join(map(str, DIMENSIONS[name]))}")
            out.append(val)
        dims[name] = tuple(dict.fromkeys(out))
    return dims


def space(budget: float, metric: str = "params", dims: dict | None = None) -> list:
    """Every distinct architecture of the dimensions whose cost is at most the budget, sorted."""
    if metric not in METRICS:
        raise UserError(f"unknown budget metric {metric!r}; choose {', '.join(METRICS)}")
    dims = dims or DIMENSIONS
    archs = {Arch(d, w, k, b).canonical() for d in dims["depth"] for w in dims["width"]
             for k in dims["kernel"] for b in dims["block"]}
    fit = sorted(a for a in archs if a.cost(metric) <= budget)
    if not fit:
        least = min(archs, key=lambda a: a.cost(metric))
        raise UserError(f"no architecture of the space has at most {budget:g} {metric}: the smallest "
                        f"({least.key}) has {least.cost(metric)}")
    return fit


def _net_class():
    from ..models.convnet import ConvNet

    class NASConvNet(ConvNet):
        """models/convnet.ConvNet (its forward and initialization) with an Arch's layer specs."""

        def __init__(self, arch: Arch, seed: int = 0):
            import torch
            from torch import nn
            nn.Module.__init__(self)
            self.arch, self.size, self.dropout, self.block, self.resolution = arch, None, 0.0, arch.block, 16
            self.specs = arch.specs()
            self.dropout_units = self.specs[-1]["cin"]
            for s in self.specs:
                shp = (s["cout"], s["cin"]) if s["name"] == "head" else (s["cout"], s["cin"] // s["groups"], s["k"],
                                                                         s["k"])
                setattr(self, f"{s['name']}_w", nn.Parameter(torch.empty(shp)))
                setattr(self, f"{s['name']}_b", nn.Parameter(torch.zeros(s["cout"])))
            self._init(seed)
    return NASConvNet


def NASConvNet(arch: Arch, seed: int = 0):  # noqa: N802 - builds the module class on first use (torch import)
    global _NAS_CLASS
    if _NAS_CLASS is None:
        _NAS_CLASS = _net_class()
    return _NAS_CLASS(arch, seed)


_NAS_CLASS = None


# -- training: the one engine -------------------------------------------------------------------
def arch_config(arch: Arch, passes: int, lr: float = 6e-3):
    from ..config import apply_overrides, preset
    return apply_overrides(preset("modern"), [
        "model.name=convnet", f"model.depth={2 * arch.depth + 1}", f"model.width={arch.width}",
        f"model.block={arch.block}", "model.dropout=0", "train.shift=0", f"train.passes={passes}",
        f"optim.lr={lr}"])


def train_arch(arch: Arch, data, passes: int, seed: int = 0, split: str = "val") -> dict:
    """Train one architecture on the population engine; its error on the validation split after
    every pass (split="val"), or on the test split once, after the last pass (split="test")."""
    import torch

    from ..engine.population import Population

    cfg = arch_config(arch, passes)

    class _Pop(Population):
        def _build_model(self, s):
            return arch.build(s).train()

    torch.set_num_threads(1)
    pop = _Pop(cfg, [seed], path="autograd")
    x, labels = data.train_x.reshape(-1, 16, 16).numpy(), data.train_labels.numpy()
    ex, el = getattr(data, f"{split}_x"), getattr(data, f"{split}_labels")
    errors, t0 = [], time.perf_counter()
    for _ in range(passes):
        pop.train_pass(x, labels)
        pop.end_pass()
        if split == "val" or len(errors) + 1 == passes:
            errors.append(float(pop.evaluate(ex, el, "ce")[0]["error"]))
        else:
            errors.append(None)
    return {"errors": errors, "seconds": time.perf_counter() - t0}


# -- the zero-cost proxy ------------------------------------------------------------------------
def synflow(model, input_shape=(1, 1, 16, 16)) -> float:
    """sum over parameters of theta * dR/dtheta with every theta -> |theta| (float64) and R the sum
    of the outputs for an all-ones input (Tanaka et al. 2020). The model is not changed."""
    import copy

    import torch
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    params = list(net.parameters())
    out = net(torch.ones(input_shape, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(out, params)
    with torch.no_grad():
        return float(sum((p * g).sum() for p, g in zip(params, grads)))


def ranks(x) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
    ra, rb = ranks(a), ranks(b)
    if len(ra) != len(rb) or len(ra) < 2:
        raise ValueError("spearman needs two sequences of the same length, at least 2")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den else float("nan")


# -- the exhaustive table ----------------------------------------------------------------------
def table(archs, data, passes: int, path: Path | None = None, seed: int = 0, log=None, settings=None) -> dict:
    """key -> {"arch", "params", "macs", "errors" (validation error after each pass), "seconds",
    "synflow"} for every architecture; entries already in `path` (same settings) are kept, each
    new one is written as it finishes (a stopped table resumes)."""
    settings = dict(settings or {}, passes=passes, seed=seed)
    done = {}
    if path is not None and Path(path).exists():
        try:
            saved = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the table {path}: {e}") from None
        if saved.get("settings") == settings:
            done = saved["entries"]
    for i, a in enumerate(archs):
        if a.key in done:
            continue
        r = train_arch(a, data, passes, seed)
        done[a.key] = {"arch": asdict(a), "params": a.params, "macs": a.macs, "errors": r["errors"],
                       "seconds": r["seconds"], "synflow": synflow(a.build(seed))}
        if log:
            log(f"[{i + 1}/{len(archs)}] {a.key:28s} {a.params:6d} params  val error "
                f"{' '.join(f'{e:5.2f}' for e in r['errors'])}%  ({r['seconds']:.1f} s)")
        if path is not None:
            tmp = Path(path).with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": settings, "entries": done}))
            tmp.replace(path)
    return {a.key: done[a.key] for a in archs}


# -- search strategies on the table --------------------------------------------------------------
class Evaluator:
    """A search's access to the table: evaluating an architecture at fidelity f costs f passes the
    first time, nothing after (the search remembers it). Stops the search when compute runs out."""

    def __init__(self, tab: dict, fidelity: int, compute: float):
        self.tab, self.fidelity, self.compute, self.spent = tab, int(fidelity), float(compute), 0.0
        self.seen = {}

    def can_pay(self) -> bool:
        return self.spent + self.fidelity <= self.compute + 1e-9

    def __call__(self, arch: Arch) -> float:
        if arch.key not in self.seen:
            if not self.can_pay():
                raise OutOfCompute
            self.spent += self.fidelity
            self.seen[arch.key] = self.tab[arch.key]["errors"][self.fidelity - 1]
        return self.seen[arch.key]

    def best(self) -> Arch:
        """The architecture of lowest estimated error among those evaluated (ties: the first)."""
        key = min(self.seen, key=lambda k: self.seen[k])
        return Arch(**self.tab[key]["arch"])


class OutOfCompute(Exception):
    pass


def mutate(arch: Arch, rng, archs_in_budget: set, dims: dict = DIMENSIONS) -> Arch:
    """One dimension changed to another of its values (Real et al.: one random edit), uniformly
    over the edits whose result is in the space and under the budget; the parent itself when no
    edit qualifies."""
    options = []
    for name, values in dims.items():
        for v in values:
            if v == getattr(arch, name):
                continue
            child = Arch(**{**asdict(arch), name: v}).canonical()
            if child != arch and child in archs_in_budget:
                options.append(child)
    options = sorted(set(options))
    return options[rng.integers(len(options))] if options else arch


class RegularizedEvolution:
    """Aging evolution: ask() -> the next architecture to evaluate, tell(arch, error)."""

    def __init__(self, archs, rng, population: int = 10, sample: int = 3, dims: dict = DIMENSIONS):
        if not 1 <= sample <= population:
            raise UserError(f"evolution needs 1 <= sample ({sample}) <= population ({population})")
        self.archs, self.set, self.rng, self.P, self.S, self.dims = list(archs), set(archs), rng, population, sample, dims
        self.population = []   # (arch, error), oldest first
        self.history = []

    def ask(self) -> Arch:
        if len(self.population) < self.P:      # initial population: uniform at random
            return self.archs[self.rng.integers(len(self.archs))]
        return mutate(self.tournament(), self.rng, self.set, self.dims)

    def tournament(self) -> Arch:
        """The best of S members drawn uniformly without replacement (ties: the older)."""
        idx = sorted(self.rng.choice(len(self.population), size=self.S, replace=False))
        return min((self.population[i] for i in idx), key=lambda m: m[1])[0]

    def tell(self, arch: Arch, error: float) -> None:
        self.population.append((arch, error))
        self.history.append((arch, error))
        if len(self.population) > self.P:
            self.population.pop(0)             # the oldest dies, not the worst


def run_random(ev: Evaluator, archs, rng) -> None:
    for i in rng.permutation(len(archs)):
        if not ev.can_pay():
            return
        ev(archs[i])


def run_evolution(ev: Evaluator, archs, rng, population=10, sample=3, dims=DIMENSIONS, max_steps=10_000) -> None:
    evo = RegularizedEvolution(archs, rng, population, sample, dims)
    for _ in range(max_steps):     # repeats cost nothing: bounded so a converged population ends
        if not ev.can_pay():
            return
        try:
            a = evo.ask()
            evo.tell(a, ev(a))
        except OutOfCompute:
            return


def run_tpe(ev: Evaluator, archs, seed: int, dims=DIMENSIONS, max_trials=600) -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ok = set(archs)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    for _ in range(max_trials):   # proposals already evaluated cost nothing: bounded
        if not ev.can_pay():
            return
        trial = study.ask()
        a = Arch(**{n: trial.suggest_categorical(n, list(v)) for n, v in dims.items()}).canonical()
        if a not in ok:  # over the budget: no training, told as failed
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        try:
            study.tell(trial, ev(a))
        except OutOfCompute:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return


def search(strategy: str, tab: dict, archs, fidelity: int, compute: float, seed: int, population=10, sample=3,
           dims=DIMENSIONS) -> tuple:
    """-> (the architecture the search returns, the compute it spent in passes)."""
    ev = Evaluator(tab, fidelity, compute)
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy) if strategy in STRATEGIES else 99])
    if strategy == "random":
        run_random(ev, archs, rng)
    elif strategy == "evolution":
        run_evolution(ev, archs, rng, population, sample, dims)
    elif strategy == "tpe":
        run_tpe(ev, archs, seed, dims)
    else:
        raise UserError(f"unknown search strategy {strategy!r}; choose {', '.join(STRATEGIES)}")
    return ev.best(), ev.spent


def compare(tab: dict, archs, strategies, runs, seeds: int, population=10, sample=3, dims=DIMENSIONS) -> list:
    """runs: [(fidelity, compute)] -> per (strategy, fidelity): regret against the table's best at
    the table's fidelity (the last pass), mean, std and the n search seeds' values, and the
    evaluations actually spent (TPE may stop proposing new architectures: its proposals then
    repeat ones it has, which cost nothing, until its trial limit)."""
    top = len(next(iter(tab.values()))["errors"])
    truth = {k: v["errors"][top - 1] for k, v in tab.items()}
    best = min(truth.values())
    rows = []
    for fidelity, compute in runs:
        for strat in strategies:
            regrets, found, spent = [], [], []
            for s in range(seeds):
                a, paid = search(strat, tab, archs, fidelity, compute, s, population, sample, dims)
                regrets.append(truth[a.key] - best)
                found.append(a.key)
                spent.append(paid / fidelity)
            rows.append({"strategy": strat, "fidelity": fidelity, "compute_passes": compute,
                         "evaluations": compute / fidelity, "seeds": seeds,
                         "evaluations_spent_mean": float(np.mean(spent)),
                         "regret_mean": float(np.mean(regrets)),
                         "regret_std": float(np.std(regrets, ddof=1)) if seeds > 1 else 0.0,
                         "found_best": sum(r == 0 for r in regrets), "regrets": regrets, "chosen": found})
    return rows


def diff_ci(a, b) -> tuple:
    """Mean of a - b (independent samples) and its 95% interval (normal approximation)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a.mean() - b.mean()
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(a) > 1 and len(b) > 1 else float("nan")
    return float(d), float(d - 1.96 * se), float(d + 1.96 * se)


def proxy_report(tab: dict) -> dict:
    """Spearman rank correlations with minus the trained validation error (higher = ranks better):
    synflow, the parameter count, multiply-adds, and each lower fidelity."""
    keys = sorted(tab)
    top = len(tab[keys[0]]["errors"])
    neg = [-tab[k]["errors"][top - 1] for k in keys]
    out = {"architectures": len(keys), "fidelity": top,
           "synflow": spearman([math.log(max(tab[k]["synflow"], 1e-300)) for k in keys], neg),
           "params": spearman([tab[k]["params"] for k in keys], neg),
           "macs": spearman([tab[k]["macs"] for k in keys], neg)}
    for f in range(1, top):
        out[f"val_after_{f}_passes"] = spearman([-tab[k]["errors"][f - 1] for k in keys], neg)
    return out
