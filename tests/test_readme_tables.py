"""scripts/readme_tables.py: the README's effects block is written from the store's newest
effects record, and --check tells a stale README from a current one."""
import importlib.util
from pathlib import Path

from backproplab.store import add_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_tables.py"
spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)


def row(method, err, diff=0.0, t=10.0, ps=40, sp=1.0):
    return {"method": method, "path": "kernel", "seeds": 8, "test_error": err, "test_error_std": 0.2, "diff": diff,
            "ci_low": diff - 0.3, "ci_high": diff + 0.3, "p_value": 0.04, "seconds_per_seed": 6.0,
            "time_to_base": t, "passes_to_base": ps, "base_error": 1.8, "speedup": sp}


def store_with(tmp_path, errors):
    tmp_path.mkdir()
    for e in errors:
        summary = {"base": "modern", "seeds": 8, "passes": 80, "eval_every": 4, "smoke": False,
                   "rows": [row("base", 1.8), row("ema", e, e - 1.8, None, None, None)],
                   "composition": [], "skipped": {"rezero": "needs resblocks"}}
        add_run(tmp_path, "effects", "effects:modern", "finished", {}, summary, [], {})
    return tmp_path


def test_the_block_is_the_newest_record_and_check_sees_staleness(tmp_path):
    store = store_with(tmp_path / "s", [2.5, 1.70])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- effects:modern:begin -->\nold table\n<!-- effects:modern:end -->\nrest\n")
    assert rt.main(["--store", str(store), "--readme", str(readme), "--check"]) == 1
    assert rt.main(["--store", str(store), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- effects:modern:begin -->\n") and text.endswith("<!-- effects:modern:end -->\nrest\n")
    assert "old table" not in text
    assert "| ema | kernel | 1.70 +- 0.20 | -0.10 [-0.40, +0.20] | 0.040 | 6.0 | never | - |" in text  # the newest
    assert "| base | kernel | 1.80 +- 0.20 | (base) |  | 6.0 | 10.0 (40) | 1.00 |" in text
    assert "- skipped rezero: needs resblocks" in text and "test split every 4 passes" in text
    assert rt.main(["--store", str(store), "--readme", str(readme), "--check"]) == 0


def test_missing_block_or_record_is_a_one_line_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert rt.main(["--store", str(store_with(tmp_path / "s", [2.0])), "--readme", str(readme)]) == 2
    assert rt.main(["--store", str(tmp_path / "none"),
                    "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert readme.read_text() == "no markers\n"


def test_rows_in_the_registry_order_and_the_base_again_named():
    """Rows stored in the order the runs finished read in the registry's order (pairs last), and a
    method whose run was the base's again is named under the table."""
    rows = [row("base", 1.8), row("tta", 1.8), row("sgd", 5.0, 3.2), row("tta+swa", 1.7, -0.1), row("swa", 1.9, 0.1)]
    rows[1]["same_as_base"] = True
    text = rt.render({"id": 3, "status": "finished", "summary": {
        "base": "modern", "seeds": 8, "passes": 80, "eval_every": 4, "rows": rows, "composition": [], "skipped": {}}})
    order = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "kernel" in line]
    assert order == ["base", "sgd", "swa", "tta", "tta+swa"]
    assert "not paired): tta" in text
