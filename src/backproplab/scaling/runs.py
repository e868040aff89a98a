"""The table every scaling fit works on (one row per training run), and reading it from a
results store.

A run: N parameters, D training examples seen (= epochs x training-set size), C training
FLOPs, loss = validation loss (nats), lr = peak learning rate, epochs (may be fractional),
U = the training-set size (unique examples available), family (model family name).
lr / epochs / U are NaN when unknown.
"""
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .fit import MIN_CHINCHILLA_RUNS, MIN_DISTINCT, MIN_FRONTIER_RUNS, chinchilla_problem

FIELDS = ("N", "D", "C", "loss", "lr", "epochs", "U")
REQUIRED = ("N", "D", "C", "loss")


@dataclass(frozen=True)
class Runs:
    N: np.ndarray          # (R,) float
    D: np.ndarray          # (R,)
    C: np.ndarray          # (R,)
    loss: np.ndarray       # (R,)
    lr: np.ndarray         # (R,) NaN if unknown
    epochs: np.ndarray     # (R,) NaN if unknown
    family: np.ndarray     # (R,) object array of str
    info: dict = field(default_factory=dict, compare=False)   # where they came from, what was skipped
    U: np.ndarray | None = None   # (R,) training-set size; None -> all NaN (unknown)
    # (R,) bool: the run is its cell's chosen rate, trained for more seeds than the cell's other
    # rates (a study that sweeps on some seeds only); None -> no run is marked
    chosen: np.ndarray | None = None

    def __post_init__(self):
        if self.U is None:
            object.__setattr__(self, "U", np.full(len(self.loss), np.nan))
        if self.chosen is None:
            object.__setattr__(self, "chosen", np.zeros(len(self.loss), bool))

    def __len__(self):
        return len(self.loss)

    def take(self, idx) -> "Runs":
        idx = np.asarray(idx)
        return Runs(**{f: getattr(self, f)[idx] for f in FIELDS}, family=self.family[idx], info=self.info,
                    chosen=self.chosen[idx])

    @property
    def n_train(self) -> np.ndarray:
        """Training-set size: U where known, else D / epochs (NaN where both are unknown)."""
        with np.errstate(all="ignore"):
            return np.where(np.isfinite(self.U), self.U, self.D / self.epochs)

    def repeats_data(self) -> bool:
        """True when the training-set size of every run is known and some run saw an example
        more than once (D > U): the case the repeated-data fit is for."""
        return bool(len(self)) and bool(np.isfinite(self.U).all()) and bool((self.D > self.U * (1 + 1e-9)).any())

    def families(self) -> list[str]:
        return sorted(set(self.family.tolist()))

    def records(self) -> list[dict]:
        return [{**{f: float(getattr(self, f)[i]) for f in FIELDS}, "family": str(self.family[i])}
                for i in range(len(self))]


def as_runs(x) -> Runs:
    """Runs from Runs, a dict of equal-length arrays, or a list of dicts (record per run)."""
    if isinstance(x, Runs):
        return x
    if isinstance(x, dict):
        cols = x
        R = len(np.atleast_1d(cols["loss"]))
    else:
        recs = list(x)
        R = len(recs)
        cols = {f: [r.get(f, np.nan) for r in recs] for f in FIELDS}
        cols["family"] = [r.get("family", "model") for r in recs]
    arr = {}
    for f in FIELDS:
        v = cols.get(f)
        a = np.full(R, np.nan) if v is None else np.broadcast_to(np.asarray(v, dtype=float), (R,)).copy()
        if f in REQUIRED and (~np.isfinite(a) | (a <= 0)).any():
            raise UserError(f"run field {f} must be finite and positive in every run")
        if f == "U":
            a[~(a > 0)] = np.nan              # a training-set size that is not positive is unknown
        arr[f] = a
    fam = cols.get("family")
    fam = np.array(["model"] * R if fam is None else [str(s) for s in np.broadcast_to(np.asarray(fam), (R,))],
                   dtype=object)
    ch = cols.get("chosen") if isinstance(x, dict) else [bool(r.get("chosen", False)) for r in recs]
    return Runs(**arr, family=fam, chosen=None if ch is None else np.broadcast_to(np.asarray(ch, bool), (R,)).copy())


def best_per_cell(runs) -> Runs:
    """Keep the lowest-loss run of each cell (family, N, D, epochs): the learning-rate sweep
    of a cell collapses to its best learning rate, as in the study design (seed 002). A cell
    whose rates were swept on fewer seeds than its chosen rate keeps the chosen one (its
    other rates' losses are means over fewer seeds: not comparable with it)."""
    runs = as_runs(runs)
    best: dict = {}
    for i in range(len(runs)):
        ep = runs.epochs[i]
        key = (runs.family[i], runs.N[i], runs.D[i], -1.0 if np.isnan(ep) else ep)
        if key not in best or (runs.chosen[i], -runs.loss[i]) > (runs.chosen[best[key]], -runs.loss[best[key]]):
            best[key] = i
    return runs.take(np.array(sorted(best.values()), dtype=int))


def fit_requirements() -> str:
    return (f"the frontier needs >= {MIN_FRONTIER_RUNS} runs; the Chinchilla form (5 parameters) needs "
            f">= {MIN_CHINCHILLA_RUNS} runs with >= {MIN_DISTINCT} distinct N and >= {MIN_DISTINCT} distinct D")


def _open_readonly(path: Path) -> sqlite3.Connection:
    # Read-only: the store's own _connect creates the runs table, which would write into a
    # foreign database handed to `scale fit` by mistake.
    try:
        con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30.0)
        con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        return con
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path} is not an SQLite results store ({e})") from None


def _expand_sweep(rec: dict, summary: dict, status: str, seed_weights=None) -> list[dict]:
    """A study cell's record holds its whole learning-rate sweep (summary['sweep']: lr,
    val_loss, status per rate; val_loss is the mean over the cell's seeds, val_loss_seeds
    the seeds' own); each rate becomes one run. Other records are one run of one seed.
    seed_weights (one weight per position of val_loss_seeds): the loss is that weighted mean
    of the seeds' losses instead (one seed alone, or a resample of the seeds)."""
    sweep = summary.get("sweep")
    if not isinstance(sweep, list) or not sweep:
        return [{**rec, "status": status, "n_seeds": 1, "chosen": False}]
    seeds, swept = summary.get("seeds"), summary.get("sweep_seeds")
    partial = isinstance(seeds, list) and isinstance(swept, list) and len(swept) < len(seeds)
    out = []
    for r in sweep:
        loss = r.get("val_loss")
        per = r.get("val_loss_seeds")
        chosen = partial and summary.get("lr") is not None and float(r["lr"]) == float(summary["lr"])
        if chosen:                        # the chosen rate: every seed's loss (the others ran it alone)
            loss, per = summary.get("val_loss"), summary.get("val_loss_seeds")
        elif partial and seed_weights is not None:
            continue                      # swept on fewer seeds than the weights: only the chosen rate counts
        if seed_weights is not None:
            w = np.asarray(seed_weights, dtype=float)
            if not isinstance(per, list) or len(per) != len(w) or any(v is None for v in per):
                raise UserError(f"a cell's record has {len(per) if isinstance(per, list) else 0} seeds' losses, "
                                f"not the {len(w)} the seed weights need")
            loss = float(np.dot(w, per) / w.sum())
        out.append({**rec, "lr": float(r["lr"]), "loss": np.nan if loss is None else float(loss),
                    "status": r.get("status", status), "n_seeds": len(per) if isinstance(per, list) and per else 1,
                    "chosen": chosen})
    return out


def _average_seeds(recs: list[dict]) -> tuple[list[dict], dict]:
    """One run per (family, N, D, epochs, lr): the mean loss over the seeds that ran it (a
    record may hold several seeds, and a store several records of one cell: each record's
    mean weighs by its seeds). Returns the runs and {seeds per run: count}."""
    groups: dict = {}
    for r in recs:
        groups.setdefault((r["family"], r["N"], r["D"], r["epochs"], r["lr"]), []).append(r)
    out, n_seeds = [], {}
    for g in groups.values():
        w = np.array([r.get("n_seeds", 1) for r in g], dtype=float)
        out.append({**g[0], "loss": float(np.dot(w, [r["loss"] for r in g]) / w.sum()),
                    "chosen": any(r.get("chosen", False) for r in g)})
        n_seeds[int(w.sum())] = n_seeds.get(int(w.sum()), 0) + 1
    return out, n_seeds


def _validation_of(config) -> str:
    """What a study record was validated on: the training carve-out of `scale run` (config 'split',
    'n_val'), or, in records without a split (stores written before it), the test split."""
    if isinstance(config, dict) and config.get("split"):
        return f"the last {config.get('n_val')} training examples"
    if isinstance(config, dict) and "n_val" in config:
        return "the test split (older layout: the rate was chosen on it)"
    return "unknown"


def _seed_spread(s: dict) -> dict | None:
    """A cell record's seed-to-seed spread at its chosen rate: (N, D, C, loss, relative sd), or None."""
    per = s.get("val_loss_seeds")
    if not isinstance(per, list) or len(per) < 2 or any(v is None for v in per) or not s.get("loss"):
        return None
    return {"N": float(s["N"]), "D": float(s["D"]), "C": float(s["C"]), "loss": float(s["loss"]),
            "n_seeds": len(per), "rel_sd": float(np.std(per, ddof=1) / np.mean(per))}


def recipe_of(config) -> str:
    """A study record's recipe: 'base', or its methods as `scale run +method=...` gave them
    ('sam:rho=0.05+ema'), options in their stored order."""
    methods = config.get("methods") if isinstance(config, dict) else None
    if not methods:
        return "base"
    parts = []
    for m in methods:
        opts = ",".join(f"{k}={v}" for k, v in (m.get("options") or {}).items())
        parts.append(m["name"] + (f":{opts}" if opts else ""))
    return "+".join(parts)


def _store_rows(db_path) -> tuple:
    """(where: the path of runs.db, or a server store's host:port/db; [(kind, status, config,
    summary)] in id order, config and summary as JSON text); one-line errors for a missing,
    unreadable or foreign store. db_path: a folder, its runs.db, or a store URL."""
    from ..store import is_url
    if is_url(db_path):
        from ..store import list_runs, where
        return where(db_path), [(r["kind"], r["status"], json.dumps(r["config"]), json.dumps(r["summary"]))
                                   for r in list_runs(db_path)]
    path = Path(db_path)
    if path.is_dir():
        path = path / "runs.db"
    if not path.is_file():
        raise UserError(f"no results store at {path}")
    con = _open_readonly(path)
    try:
        cols = {r[1] for r in con.execute("PRAGMA table_info(runs)").fetchall()}
        need = {"kind", "status", "config", "summary"}
        if not need <= cols:
            raise UserError(f"{path} is not a backproplab results store (no 'runs' table with columns "
                            f"{', '.join(sorted(need))})")
        return path, con.execute("SELECT kind, status, config, summary FROM runs ORDER BY id").fetchall()
    except sqlite3.DatabaseError as e:
        raise UserError(f"results store {path} is unreadable: {e}") from None
    finally:
        con.close()


def store_recipes(db_path, kind: str = "scale") -> dict:
    """recipe -> number of `kind` records in the store."""
    out: dict = {}
    for rkind, _, config, _ in _store_rows(db_path)[1]:
        if rkind != kind:
            continue
        try:
            lab = recipe_of(json.loads(config))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        out[lab] = out.get(lab, 0) + 1
    return out


def load_runs_from_store(db_path, kind: str = "scale", min_runs: int = MIN_FRONTIER_RUNS,
                         require_chinchilla: bool = False, recipe: str | None = None, seed_weights=None) -> Runs:
    """Scale runs (records of `kind`) from a results store file (a folder holding runs.db, or a
    store URL: postgresql+psycopg://...).

    Each record's summary holds N, D, C, loss, lr, epochs, family (lr/epochs/family may
    also come from its config). Runs that diverged or have a non-finite loss are skipped
    and counted in .info. Raises UserError for a missing, non-SQLite or foreign file, and
    for fewer than `min_runs` usable runs (default: what the frontier needs), or, with
    require_chinchilla, when no family has enough distinct runs for the Chinchilla form.
    recipe: only that recipe's records (recipe_of); without it a store holding several recipes
    is refused (their cells would be averaged together as one).
    seed_weights: each study cell's loss is this weighted mean of its seeds' (see _expand_sweep).
    """
    path, rows = _store_rows(db_path)
    recs, kinds, skipped, spread, splits, recipes = [], {}, {"diverged": 0, "malformed": 0}, [], {}, set()
    for rkind, status, config, summary in rows:
        kinds[rkind] = kinds.get(rkind, 0) + 1
        if rkind != kind:
            continue
        try:
            s, c = json.loads(summary), json.loads(config)
            lab = recipe_of(c)
            if recipe is not None and lab != recipe:
                continue
            recipes.add(lab)
            rec = {f: float(s[f]) if s[f] is not None else np.nan for f in REQUIRED}
            for f in ("lr", "epochs", "family", "n_train"):
                v = s.get(f, c.get(f) if isinstance(c, dict) else None)
                rec[f] = v if v is not None else (np.nan if f != "family" else "model")
            rec["lr"], rec["epochs"], rec["family"] = float(rec["lr"]), float(rec["epochs"]), str(rec["family"])
            rec["U"] = float(rec.pop("n_train"))
            split = _validation_of(c)
        except (ValueError, TypeError, KeyError, AttributeError):
            skipped["malformed"] += 1
            continue
        splits[split] = splits.get(split, 0) + 1
        sp = _seed_spread(s)
        if sp:
            spread.append({**sp, "family": rec["family"]})
        for r in _expand_sweep(rec, s, status, seed_weights):
            if r["status"] == "diverged" or not np.isfinite(r["loss"]):
                skipped["diverged"] += 1
            elif any(not np.isfinite(r[f]) or r[f] <= 0 for f in REQUIRED):
                skipped["malformed"] += 1
            else:
                recs.append({f: r[f] for f in (*FIELDS, "family", "n_seeds", "chosen")})
    if not recs and not kinds.get(kind):
        found = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "no runs at all"
        raise UserError(f"no {kind} runs in {path} (found {found}); run `backproplab scale run` first")
    if recipe is None and len(recipes) > 1:
        raise UserError(f"{path} holds {kind} runs of {len(recipes)} recipes ({', '.join(sorted(recipes))}): "
                        f"fit them apart with `scale fit DIR --compare A,B`")
    if recipe is not None and not recs and kinds.get(kind):
        known = ", ".join(sorted(store_recipes(db_path, kind))) or "none"
        raise UserError(f"no {kind} runs of recipe {recipe!r} in {path} (recipes there: {known})")
    if len(recs) < min_runs:
        extra = f" ({skipped['diverged']} diverged, {skipped['malformed']} malformed skipped)" \
            if sum(skipped.values()) else ""
        raise UserError(f"too few runs to fit in {path}: {len(recs)} usable {kind} runs{extra}; "
                        f"{fit_requirements()}")
    if len(splits) > 1:
        raise UserError(f"{path} mixes {kind} records validated on different data ("
                        + "; ".join(f"{v} on {k}" for k, v in sorted(splits.items()))
                        + "): fit each from its own store")
    recs, n_seeds = _average_seeds(recs)
    runs = as_runs(recs)
    if require_chinchilla:
        cells = best_per_cell(runs)
        whys = {f: chinchilla_problem(cells.N[cells.family == f], cells.D[cells.family == f])
                for f in cells.families()}
        if all(whys.values()):
            f, why = next(iter(whys.items()))
            raise UserError(f"too few runs to fit in {path}: {why}" + (f" (family {f})" if len(whys) > 1 else ""))
    return Runs(**{f: getattr(runs, f) for f in FIELDS}, family=runs.family, chosen=runs.chosen,
                info={"source": str(path), "n_records": len(recs), "skipped": skipped, "seeds": n_seeds,
                      "seed_spread": spread, "validation": next(iter(splits), None)})
