"""A small real results store for the report's tests: the commands' own records, at smoke size.

make_store(folder) runs, in this process, `repro --preset smoke --seeds 2`, `ladder --smoke
--rungs 1,5 --seeds 2`, `effects --smoke --methods ema --top-pairs 0` and (scale=True) `scale run
--smoke --sizes 1,2`. A scaling fit needs minutes (the Chinchilla grid), so the scale_fit record is
written the way `scale fit` writes one (fitcmd.summarize's layout) with chosen numbers; the same
for one `progress` record (compute multipliers with intervals)."""
import contextlib
import io

SCALE_FIT_SUMMARY = {
    "source": "", "n_runs": 16, "families": {"convnet": {
        "n_runs": 16, "n_cells": 8,
        "frontier": {"slope": -0.0213, "slope_ci": [-0.0311, -0.0102], "intercept": 1.1795,
                     "intercept_ci": [0.9644, 1.3154], "C_ref": 3.7e7, "loss_at_C_ref": 2.2037,
                     "loss_at_C_ref_ci": [2.1897, 2.2581], "why_no_fit": None},
        "chinchilla": {"constants": {"E": 0.812, "A": 41.5, "B": 2.62, "alpha": 0.381, "beta": 0.0321},
                       "intervals": {"E": [0.5, 1.1], "A": [12.0, 95.0], "B": [2.04, 2.95], "alpha": [0.21, 0.55],
                                     "beta": [0.0148, 0.0584], "N_opt_exponent": [0.31, 0.62],
                                     "D_opt_exponent": [0.38, 0.69]},
                       "compute_optimal": {"k": 9.3, "gamma": 1.2, "N_opt_exponent": 0.456, "D_opt_exponent": 0.544,
                                           "N_opt_coef": 2.2}, "n_boot": 20},
        "isoflop": {"N": {"exponent": None, "exponent_ci": [None, None], "n_valid_bins": 0,
                          "why_no_fit": "only 0 bins with an interior minimum (need 3)"}}}},
    "comparisons": [], "plots": {}, "seconds": 1.0}

def _m(m, lo, hi):
    return {"x": 1e11, "error": 2.0, "multiplier": m, "ci": [lo, hi], "beyond_floor": False,
            "share_beyond_floor": 0.0, "extrapolated": False}


_FIT = {"floor": 1.5, "floor_ci": [1.1, 1.8], "amplitude": 2.0, "amplitude_ci": [1.5, 2.5], "alpha": 0.61,
        "alpha_ci": [0.42, 0.83]}
# experiments/progress.py analyse()'s layout, as `backproplab progress` records it (json_safe: inf -> null)
PROGRESS_SUMMARY = {
    "rows": [{"recipe": "rung1", "n_train": 300, "passes": 8, "seeds": 2, "test_error": 9.25, "test_error_std": 0.35,
              "compute_fit": _FIT},
             {"recipe": "rung5", "n_train": 300, "passes": 8, "seeds": 2, "test_error": 4.75, "test_error_std": 0.21,
              "compute_fit": _FIT, "compute_x_over_rung1": _m(4.75, 3.1, None),
              "data_x_over_rung1": _m(2.5, 1.25, 6.0)}],
    "comparisons": [], "n_boot": 20,
    "decomposition": {"algorithms": ["rung1", "rung5"], "from_error": 12.5, "to_error": 4.75, "drop": 7.75,
                      "algorithm": {"points": 4.25, "points_ci": [3.0, 5.5], "share": 0.55, "share_ci": [0.4, 0.7]},
                      "data": {"points": 2.0, "points_ci": [1.0, 3.0], "share": 0.26, "share_ci": [0.1, 0.4]},
                      "compute": {"points": 1.5, "points_ci": [0.5, 2.5], "share": 0.19, "share_ci": [0.05, 0.3]},
                      "doubling_months": 175.4, "doubling_months_ci": [130.0, None]}}


def run(*argv) -> int:
    from backproplab.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in argv])


def make_store(folder, scale=True, extras=True):
    folder = str(folder)
    assert run("repro", "--preset", "smoke", "--seeds", 2, "--quiet", "--out", folder) == 0
    assert run("ladder", "--smoke", "--rungs", "1,5", "--seeds", 2, "--jobs", 1, "--out", folder) == 0
    assert run("effects", "--smoke", "--methods", "ema", "--top-pairs", 0, "--out", folder) == 0
    assert run("datascale", "--smoke", "--recipes", "1989", "--seeds", 2, "--jobs", 1, "--out", folder) == 0
    if scale:
        assert run("scale", "run", "--smoke", "--sizes", "1,2", "--jobs", 1, "--out", folder) == 0
    if extras:
        from backproplab.store import add_run
        if scale:
            add_run(folder, "scale_fit", "scale-fit", "finished", {"n_boot": 20, "seed": 0},
                    {**SCALE_FIT_SUMMARY, "source": f"{folder}/runs.db"}, [], {})
        add_run(folder, "progress", "progress:rung1,rung5", "finished", {}, PROGRESS_SUMMARY, [],
                {"backproplab": "0.1.0"})
    return folder


def tables(html_text: str) -> dict:
    """data-table name -> list of (row attributes, [cell texts]) for rows that carry data-* attributes."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.out, self.table, self.row, self.cell = {}, None, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table":
                self.table = a.get("data-table")
            elif tag == "tr" and self.table:
                self.row = (a, [])
            elif tag == "td" and self.row is not None:
                self.cell = []

        def handle_endtag(self, tag):
            if tag == "td" and self.cell is not None:
                self.row[1].append("".join(self.cell).strip())
                self.cell = None
            elif tag == "tr" and self.row is not None:
                if any(k.startswith("data-") for k in self.row[0]):
                    self.out.setdefault(self.table, []).append(self.row)
                self.row = None
            elif tag == "table":
                self.table = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    p = P()
    p.feed(html_text)
    return p.out


def numbers(text: str) -> list[float]:
    """The numbers in a cell: '5.08 ± 0.14' -> [5.08, 0.14]; '+4.75 [-51.55, +61.05]' -> three."""
    import re
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text.replace("−", "-"))]
