"""Anyone's runs from a CSV file, for `scale fit --csv FILE`: a user's own language-model runs,
or points read off a paper's figure.

Columns (a header row names them, in any order, any case): N (parameters), loss, and D
(training examples or tokens seen) or C (training FLOPs), or both; optional: family (model
family name), epochs, U (unique training examples), lr (peak learning rate). With only one of
D and C the other follows from C = 6 N D (the transformer approximation; give both when it
does not hold, e.g. for a convnet). Other columns are ignored (and named in the summary).
Empty optional cells are unknown. Every error names the row (data rows count from 1, after the
header) and the column.
"""
import csv
import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from .fit import MIN_FRONTIER_RUNS, chinchilla_problem
from .runs import Runs, best_per_cell

REQUIRED = ("N", "loss")
OPTIONAL = ("D", "C", "family", "epochs", "U", "lr")
POSITIVE = ("N", "loss", "D", "C", "epochs", "U", "lr")
FLOPS_PER_PARAM_EXAMPLE = 6.0


def _number(text: str, where: str, optional: bool) -> float:
    text = text.strip()
    if not text:
        if optional:
            return math.nan
        raise UserError(f"{where}: empty (a number is required)")
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{where}: {text!r} must be a finite positive number")
    return v


def load_runs_from_csv(path) -> Runs:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--csv {path}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a text CSV file ({e.reason} at byte {e.start})") from None
    except (OSError, csv.Error) as e:
        raise UserError(f"{path}: cannot read as CSV: {e}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]          # blank lines are not runs
    if not rows:
        raise UserError(f"{path}: empty; the first row names the columns (N, loss and D or C)")
    header = [h.strip() for h in rows[0]]
    known = {k.lower(): k for k in (*REQUIRED, *OPTIONAL)}
    col, ignored = {}, []
    for i, h in enumerate(header):
        k = known.get(h.lower())
        if k is None:
            ignored.append(h)
        elif k in col:
            raise UserError(f"{path}: column {k} appears twice in the header")
        else:
            col[k] = i
    missing = [k for k in REQUIRED if k not in col]
    if missing or not ({"D", "C"} & set(col)):
        need = ", ".join(missing + ([] if {"D", "C"} & set(col) else ["D or C"]))
        raise UserError(f"{path}: no column {need} in the header ({', '.join(header) or 'empty'}); "
                        f"the columns are N, loss, D or C, and optionally family, epochs, U, lr")
    if len(rows) == 1:
        raise UserError(f"{path}: a header and no runs")
    data = {k: [] for k in (*REQUIRED, *OPTIONAL)}
    for r, row in enumerate(rows[1:], start=1):
        if len(row) != len(header):
            raise UserError(f"{path} row {r}: {len(row)} fields, the header has {len(header)}")
        for k in (*REQUIRED, *OPTIONAL):
            if k == "family":
                data[k].append((row[col[k]].strip() or "model") if k in col else "model")
            elif k in col:
                data[k].append(_number(row[col[k]], f"{path} row {r}, column {header[col[k]]}", k not in REQUIRED))
            else:
                data[k].append(math.nan)
    a = {k: np.array(v, dtype=float) for k, v in data.items() if k != "family"}
    derived = []
    for k, other, f in (("C", "D", lambda N, D: FLOPS_PER_PARAM_EXAMPLE * N * D),
                        ("D", "C", lambda N, C: C / (FLOPS_PER_PARAM_EXAMPLE * N))):
        gap = ~np.isfinite(a[k])
        if gap.any():
            bad = np.flatnonzero(gap & ~np.isfinite(a[other]))
            if len(bad):
                raise UserError(f"{path} row {bad[0] + 1}, column D / C: give D or C (both are empty)")
            a[k][gap] = f(a["N"][gap], a[other][gap])
            derived.append(f"{k} = 6 N D in {int(gap.sum())} rows" if k == "C" else
                           f"D = C / (6 N) in {int(gap.sum())} rows")
    runs = Runs(N=a["N"], D=a["D"], C=a["C"], loss=a["loss"], lr=a["lr"], epochs=a["epochs"], U=a["U"],
                family=np.array(data["family"], dtype=object),
                info={"source": str(path), "n_records": len(rows) - 1, "derived": derived, "ignored_columns": ignored,
                      "validation": None})
    if len(runs) < MIN_FRONTIER_RUNS:
        raise UserError(f"{path}: {len(runs)} runs; the frontier needs >= {MIN_FRONTIER_RUNS}")
    cells = best_per_cell(runs)
    whys = {f: chinchilla_problem(cells.N[cells.family == f], cells.D[cells.family == f]) for f in cells.families()}
    if all(whys.values()):
        f, why = next(iter(whys.items()))
        raise UserError(f"too few runs to fit in {path}: {why}" + (f" (family {f})" if len(whys) > 1 else ""))
    return runs
