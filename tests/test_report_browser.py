"""The report in a real browser: Debian's headless Chromium driven by Playwright (no browser
download). The page, opened from a file, logs no console error and fails no request, every
image decodes (naturalWidth > 0), and the numbers its tables show equal the store's, read here
with sqlite3. A screenshot of the whole page is saved under the test's temporary folder."""
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from _report_store import make_store, numbers

CHROMIUM = "/usr/bin/chromium"
# ../shared/reference/servers-and-browsers.md's flags for root, offline; Playwright adds --headless and
# gives every launch a new empty profile (it refuses --user-data-dir)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def _browser_or_fail():
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.fail("headless Chromium is not installed (/usr/bin/chromium): `.ci/run` installs Debian's "
                    "chromium package; on a developer machine: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]' (no `playwright install`: "
                    "the test drives Debian's chromium)")
    return path, sync_playwright


def test_report_in_chromium(tmp_path):
    chromium, sync_playwright = _browser_or_fail()
    store = make_store(tmp_path / "store")
    from backproplab.report.html import build_report
    res = build_report([store], tmp_path / "out")
    page_file = Path(res["report"])
    errors, failed = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(page_file.as_uri(), wait_until="load")
            # decode() rejects an image the browser cannot decode whole (naturalWidth alone is read
            # from the PNG header, which a truncated file still has)
            widths = page.evaluate("Promise.all(Array.from(document.images).map("
                                   "i => i.decode().then(() => i.naturalWidth, () => 0)))")
            urls = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
            cells = page.evaluate("""() => Array.from(document.querySelectorAll('tr[data-run]')).map(tr => ({
                table: tr.closest('table').dataset.table, run: tr.dataset.run, rung: tr.dataset.rung || null,
                method: tr.dataset.method || null, cells: Array.from(tr.cells).map(td => td.innerText)}))""")
            sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [] and failed == []
    assert not [u for u in urls if not u.startswith(("data:", "file:"))]     # nothing from a network
    assert len(widths) == res["figures"] >= 8 and min(widths) > 0
    assert sections == res["sections"] + ["provenance"]
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    con = sqlite3.connect(f"{store}/runs.db")
    recs = {i: (k, json.loads(s)) for i, k, s in con.execute("SELECT id, kind, summary FROM runs")}
    con.close()

    def close(text, *want, tol=0.0051):
        got = numbers(text)
        assert len(got) == len(want) and all(abs(g - w) <= tol for g, w in zip(got, want)), (text, want)

    seen = set()
    for row in cells:
        kind, s = recs[int(row["run"])]
        c = row["cells"]
        if row["table"] == "repro":
            te = np.array([x["test_error"] for x in s["per_seed"]])
            close(c[5], round(te.mean(), 2), round(te.std(ddof=1), 2))
        elif row["table"] == "ladder":
            te = np.array([x["test_error"] for x in s["per_seed"]])
            close(c[4], round(te.mean(), 2), round(te.std(ddof=1), 2))
            close(c[5], round(np.mean([x["test_misses"] for x in s["per_seed"]]), 1), tol=0.051)
        elif row["table"] == "effects":
            r = next(r for r in s["rows"] if r["method"] == row["method"])
            close(c[3], round(r["test_error"], 2), round(r["test_error_std"], 2))
        elif row["table"] == "scale_cells":
            assert int(c[1]) == s["N"] and int(c[2]) == s["n_train"]
            close(c[6], round(s["val_loss"], 4), round(s["val_loss_sd"], 4), tol=5.1e-5)
        else:
            continue
        seen.add(row["table"])
    assert seen == {"repro", "ladder", "effects", "scale_cells"}
