"""`backproplab report`: one self-contained HTML page built from results stores.

The page holds everything it shows: CSS in a <style> element, every figure a PNG drawn by
matplotlib (Agg) into memory and inlined as a data: URI, no script, no link to the network,
so it opens from a file on a machine without one. Numbers come from the stores' records
(report/collect.py), never from printed text. The sections are a registry
(report/sections.py); a section whose data the stores do not hold is left out. Every table
and figure names its provenance: the store and run ids, the command that made them, the
config digests, the versions and git revision recorded with the runs, and the date.
"""
import base64
import html
import io
import math
import os
import tempfile
import time
from pathlib import Path

from ..errors import UserError

REPORT_NAME = "report.html"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 1.2em 3em; color: #1d1d1f; }
h1 { margin-top: 1.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; vertical-align: top; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.published td { color: #555; font-style: italic; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .prov { font-size: 12px; color: #555; }
.prov code, td code { font-size: 11.5px; }
nav ul { columns: 2; } .note { color: #555; } .wide { overflow-x: auto; }
"""


def esc(v) -> str:
    return html.escape(str(v), quote=True)


def fmt(v, spec=".2f", none="–") -> str:
    """A number as text; None and NaN as a dash (an undefined interval, a target never reached)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def pm(mean, sd, spec=".2f", unit="") -> str:
    """'mean ± sd' (the sd left out for one seed: sd None)."""
    s = fmt(mean, spec) + unit
    return s if sd is None else f"{s} ± {fmt(sd, spec)}"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def draw(fn, *args, **kw) -> bytes | None:
    """Call a plot function that draws into a file object; -> PNG bytes (None: no matplotlib)."""
    buf = io.BytesIO()
    if fn(*args, path=buf, **kw) is None:
        return None
    return buf.getvalue()


class Page:
    """Numbered tables and figures, each with a provenance line and an entry in the appendix."""

    def __init__(self, describe):
        self.describe = describe           # runs -> list of provenance dicts (collect.provenance)
        self.items: list[dict] = []        # {"id", "what", "title", "prov"}

    def _register(self, what: str, title: str, runs) -> dict:
        item = {"id": f"{what}-{sum(1 for i in self.items if i['what'] == what) + 1}", "what": what,
                "title": title, "prov": self.describe(runs)}
        self.items.append(item)
        return item

    def _prov_line(self, item) -> str:
        parts = []
        for p in item["prov"]:
            parts.append(f"{esc(p['runs_text'])} of <code>{esc(p['store'])}</code> "
                         f"(<code>{esc(p['command'])}</code>; config {esc(p['digests'])}; "
                         f"{esc(p['versions'])}; git {esc(p['git'])}; {esc(p['date'])})")
        return (f'<div class="prov">Provenance: {"; ".join(parts)}. '
                f'<a href="#prov-{item["id"]}">details</a></div>')

    def table(self, title: str, head: list, rows: list, runs, row_attrs=None, classes=None, key=None) -> str:
        """rows: lists of cell texts (already formatted); row_attrs: per row a dict of data-* attributes;
        classes: per column 'num' or ''. key names the table (data-table) for readers of the page."""
        item = self._register("table", title, runs)
        classes = classes or [""] * len(head)
        out = [f'<div class="wide"><table id="{item["id"]}" data-table="{esc(key or item["id"])}">',
               f'<caption class="note">Table {item["id"].split("-")[1]}: {esc(title)}</caption>',
               "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
        for i, row in enumerate(rows):
            attrs = (row_attrs[i] if row_attrs else None) or {}
            a = "".join(f' {k}="{esc(v)}"' for k, v in attrs.items())
            out.append(f"<tr{a}>" + "".join(f'<td class="{c}">{esc(v)}</td>' if c else f"<td>{esc(v)}</td>"
                                            for v, c in zip(row, classes)) + "</tr>")
        out.append("</table></div>")
        return "\n".join(out) + self._prov_line(item)

    def figure(self, title: str, png: bytes | None, runs, alt: str) -> str:
        if not png:
            return f'<p class="note">{esc(title)}: not drawn (matplotlib, the plots extra, is not installed).</p>'
        item = self._register("figure", title, runs)
        return (f'<figure id="{item["id"]}"><img src="{png_uri(png)}" alt="{esc(alt)}">'
                f'<figcaption>Figure {item["id"].split("-")[1]}: {esc(title)}</figcaption></figure>'
                + self._prov_line(item))

    def appendix(self) -> str:
        out = ["<table><tr><th>item</th><th>store</th><th>runs</th><th>command</th><th>config digests</th>"
               "<th>versions</th><th>git revision</th><th>recorded</th></tr>"]
        for it in self.items:
            for j, p in enumerate(it["prov"]):
                first = f'<td rowspan="{len(it["prov"])}" id="prov-{it["id"]}">{esc(it["id"])}: {esc(it["title"])}</td>' \
                    if j == 0 else ""
                out.append(f"<tr>{first}<td><code>{esc(p['store'])}</code></td><td>{esc(p['runs_text'])}</td>"
                           f"<td><code>{esc(p['command'])}</code></td><td><code>{esc(p['digests'])}</code></td>"
                           f"<td>{esc(p['versions'])}</td><td><code>{esc(p['git'])}</code></td>"
                           f"<td>{esc(p['date'])}</td></tr>")
        out.append("</table>")
        return "\n".join(out)


def render_page(ctx, chosen, page: Page, builder_env: dict, seconds_hint=None) -> str:
    """chosen: [(Section, body html)] in order."""
    stores = ", ".join(f"<code>{esc(s)}</code>" for s in ctx.stores)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    nav = "".join(f'<li><a href="#{esc(s.name)}">{esc(s.title)}</a></li>' for s, _ in chosen)
    body = "\n".join(f'<section id="{esc(s.name)}" data-section="{esc(s.name)}"><h2>{esc(s.title)}</h2>\n{b}'
                     f"</section>" for s, b in chosen)
    rev = builder_env.get("git", "unknown")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>backproplab report</title>
<style>{CSS}</style></head>
<body>
<h1>backproplab report</h1>
<p>Built {esc(when)} from {stores} ({len(ctx.runs)} stored runs) by backproplab
{esc(builder_env.get("backproplab", "?"))} (git <code>{esc(rev[:12])}</code>). Every number below is read from
the results store; errors are in percent of the split, mean ± sample standard deviation over the seeds
a row names. Sections for what the store does not hold are left out.</p>
<nav><ul>{nav}<li><a href="#provenance">Provenance of every table and figure</a></li></ul></nav>
{body}
<section id="provenance" data-section="provenance"><h2>Provenance of every table and figure</h2>
<p class="note">For each table and figure: the store and the run ids it was read from, the command that made
those runs (from the record's kind and config), their config digests, the versions and git revision recorded
with them, and when they were recorded (UTC).</p>
{page.appendix()}
</section>
</body></html>
"""


def write_atomic(path: Path, text: str) -> None:
    """The new page, or the old one if anything fails: a temporary file renamed over it."""
    data = text.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())   # as an ordinary new file (mkstemp makes it 0600)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare_folder(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror or e}") from None
    return out


def build_report(stores, out) -> dict:
    """Read the stores, render every section that has data, write OUT/report.html.
    -> {"report", "bytes", "seconds", "sections", "left_out", "stores", "runs", "section_seconds",
    "tables", "figures"}."""
    from ..engine.train import environment
    from .collect import Context, provenance
    from .sections import SECTIONS
    t0 = time.perf_counter()
    ctx = Context.load(stores)        # every store read (and checked) before anything is made or drawn
    timing, present, left_out = {"read": time.perf_counter() - t0}, [], {}
    for s in SECTIONS:
        t1 = time.perf_counter()
        if s.has_data(ctx):
            present.append(s)
        else:
            left_out[s.name] = s.absent
        timing[s.name] = time.perf_counter() - t1
    if not present:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(ctx.kind_counts().items())) or "no runs at all"
        raise UserError(f"nothing to report: {', '.join(map(str, ctx.stores))} holds {kinds}; the report shows "
                        f"repro, ladder, effects, scale and progress runs")
    out = prepare_folder(out)
    page, chosen = Page(provenance), []
    for s in present:
        t1 = time.perf_counter()
        chosen.append((s, s.render(ctx, page)))
        timing[s.name] += time.perf_counter() - t1
    text = render_page(ctx, chosen, page, environment())
    path = out / REPORT_NAME
    try:
        write_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return {"report": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0,
            "sections": [s.name for s, _ in chosen], "left_out": left_out,
            "stores": [str(s) for s in ctx.stores], "runs": len(ctx.runs), "section_seconds": timing,
            "tables": sum(1 for i in page.items if i["what"] == "table"),
            "figures": sum(1 for i in page.items if i["what"] == "figure")}
