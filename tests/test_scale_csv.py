"""`backproplab scale fit --csv FILE`: runs from a CSV made from known constants (plus noise) are
fitted back to those constants, exactly as the same arrays fitted directly; a malformed CSV is one
line naming the row and the column."""
import csv
import json

import numpy as np
import pytest

from backproplab.cli import main
from backproplab.scaling import BESIROGLU, fit_chinchilla, synthetic_runs
from backproplab.scaling import fitcmd, fit_report
from backproplab.scaling.csvruns import load_runs_from_csv

# one start near the optimum, not the fitter's grid of hundreds: the tests check the file's path
# into the fitter, and test_scaling_fit.py checks the fitter's search
ONE_START = {"alpha": (0.3,), "beta": (0.3,), "e": (0.5,), "a": (6.0,), "b": (7.0,)}


def _write(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_csv_of_known_constants_is_fitted_back_to_them(tmp_path):
    truth = synthetic_runs(noise=0.01, seed=3)        # Besiroglu et al.'s constants, 81 runs, C = 6 N D
    rows = []
    for i in range(len(truth)):                       # half the rows give D, half give C; two spellings
        d_or_c = ["", repr(float(truth.C[i]))] if i % 2 else [repr(float(truth.D[i])), ""]
        rows.append([repr(float(truth.N[i])), *d_or_c, repr(float(truth.loss[i])), "lm", "from a paper"])
    path = _write(tmp_path / "runs.csv", ["n", "D", "C", "Loss", "family", "note"], rows)
    runs = load_runs_from_csv(path)
    np.testing.assert_allclose(runs.D, truth.D, rtol=1e-12)
    np.testing.assert_allclose(runs.C, truth.C, rtol=1e-12)
    assert runs.info["ignored_columns"] == ["note"] and set(runs.family) == {"lm"}
    np.testing.assert_allclose(runs.loss, truth.loss, rtol=1e-15)   # the fit sees the same runs
    got = fit_chinchilla(runs.N, runs.D, runs.loss, n_boot=0, grid=ONE_START).params
    assert abs(got["alpha"] - BESIROGLU["alpha"]) <= 0.02 and abs(got["beta"] - BESIROGLU["beta"]) <= 0.02
    assert abs(got["E"] / BESIROGLU["E"] - 1) <= 0.02


def test_the_command_fits_a_csv_and_writes_its_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fitcmd, "fit_report", lambda *a, **k: fit_report(*a, **k, grid=ONE_START, plots=False))
    truth = synthetic_runs(noise=0.005, n_N=5, n_D=5, seed=1)
    path = _write(tmp_path / "r.csv", ["N", "D", "C", "loss", "epochs", "lr"],
                  [[float(truth.N[i]), float(truth.D[i]), float(truth.C[i]), float(truth.loss[i]),
                    float(truth.epochs[i]), ""] for i in range(len(truth))])
    assert main(["scale", "fit", "--csv", str(path), "--n-boot", "0", "--json", "--out", str(tmp_path / "fit")]) == 0
    cap = capsys.readouterr()
    s = json.loads(cap.out.strip().splitlines()[-1])
    ch = s["families"]["model"]["chinchilla"]["constants"]
    assert s["n_runs"] == 25
    assert abs(ch["alpha"] - BESIROGLU["alpha"]) < 0.05 and abs(ch["beta"] - BESIROGLU["beta"]) < 0.05
    rep = json.loads((tmp_path / "fit" / "scaling_report.json").read_text())
    assert rep["fits"]["model"]["chinchilla"]["constants"] == pytest.approx(ch)
    assert "Chinchilla  L = E + A/N^alpha + B/D^beta" in cap.out


GOOD = ["1e6", "1e8", "2.5"]


@pytest.mark.parametrize("header, bad_row, words", [
    (["N", "D", "loss"], ["1e6", "1e8", "abc"], ["row 3", "column loss", "'abc' is not a number"]),
    (["N", "D", "loss"], ["-5", "1e8", "2.0"], ["row 3", "column N", "positive"]),
    (["N", "D", "loss"], ["1e6", "", "2.0"], ["row 3", "column D", "empty"]),
    (["N", "C", "loss", "lr"], ["1e6", "6e14", "2.0", "fast"], ["row 3", "column lr", "'fast' is not a number"]),
    (["N", "D", "loss"], ["1e6", "1e8"], ["row 3", "2 fields", "header has 3"]),
    (["N", "loss"], ["1e6", "2.0"], ["no column D or C"]),
    (["N", "D", "D", "loss"], ["1e6", "1e8", "1e8", "2.0"], ["column D appears twice"]),
])
def test_a_malformed_csv_is_one_line_naming_row_and_column(tmp_path, capsys, header, bad_row, words):
    good = (GOOD + ["1e-3"] * 4)[:len(header)]
    path = _write(tmp_path / "bad.csv", header, [good[:len(header)], good[:len(header)], bad_row])
    before = path.read_bytes()
    assert main(["scale", "fit", "--csv", str(path), "--n-boot", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err
    assert path.read_bytes() == before and not (tmp_path / "scaling").exists()


def test_csv_store_and_synthetic_are_exclusive_and_a_missing_file_is_named(tmp_path, capsys):
    assert main(["scale", "fit", "--csv", str(tmp_path / "none.csv")]) == 2
    assert main(["scale", "fit", "--csv", str(tmp_path / "a.csv"), "--synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no such file" in err[0] and "not --synthetic and --csv" in err[1]
