"""`backproplab export tensorboard DIR [--out STORE]`: the stored runs as TensorBoard event files.

One TensorBoard run per stored run and replica, DIR/run0007-repro-lecun1989/seed0, with the
scalars of every evaluated pass (step = pass): train/loss, train/error, train/misses, the same
for val and test, and time/pass_seconds (that pass's training seconds), read from the run's
stored history. Wall times are the run's: its record's time minus its training seconds, plus the
training seconds up to each pass. Records without a per-pass history (scaling cells, effects
summaries) are skipped and counted. Exporting again replaces a run's event files.
Needs the optional `tensorboard` package: pip install -e '.[tensorboard]'.
"""
import re
from pathlib import Path

from ..errors import UserError
from ..jsonout import emit_json

SPLITS = ("train", "val", "test")
METRICS = ("loss", "error", "misses")
INSTALL = "pip install -e '.[tensorboard]'"


def register(sub, add_common):
    e = sub.add_parser("export", help="export the results store to other tools: export tensorboard DIR")
    es = e.add_subparsers(dest="export_cmd")
    tb = es.add_parser("tensorboard", help="TensorBoard event files: scalars per pass per replica, per stored run")
    add_common(tb)
    tb.add_argument("dir", help="where the event files go (then: tensorboard --logdir DIR)")
    tb.add_argument("--runs", help="comma-separated run ids (default: every run with a per-pass history)")


def _tensorboard():
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise UserError(f"export tensorboard needs the tensorboard package: {INSTALL}") from None
    return event_pb2, summary_pb2, EventFileWriter


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "run"


def run_folder(run: dict) -> str:
    return f"run{run['id']:04d}-{_safe(run['kind'])}-{_safe(run['name'])}"


def _seeds(run: dict, n: int) -> list:
    per = run["summary"].get("per_seed")
    if isinstance(per, list) and len(per) == n and all(isinstance(p, dict) and "seed" in p for p in per):
        return [p["seed"] for p in per]
    train = (run.get("config") or {}).get("train") or {}
    first = train.get("seed", 0) if isinstance(train.get("seed", 0), int) else 0
    return [first + k for k in range(n)]


def _replicas(history: list) -> int | None:
    """How many replicas the history's records hold, or None when it is not a per-pass history."""
    if not isinstance(history, list) or not history:
        return None
    ns = set()
    for rec in history:
        if not isinstance(rec, dict) or not isinstance(rec.get("pass"), int):
            return None
        for sp in SPLITS:
            if sp in rec:
                if not isinstance(rec[sp], list):
                    return None
                ns.add(len(rec[sp]))
    return ns.pop() if len(ns) == 1 else None


def scalars(run: dict) -> dict:
    """-> {seed: [(tag, step, value, wall_time)]} from the run's history ({} when it has none)."""
    hist = run.get("history")
    n = _replicas(hist)
    if not n:
        return {}
    total = float(hist[-1].get("seconds_total") or 0.0)
    start = float(run["created"]) - total
    out = {}
    for r, seed in enumerate(_seeds(run, n)):
        rows = []
        for rec in hist:
            step, wall = rec["pass"], start + float(rec.get("seconds_total") or 0.0)
            for sp in SPLITS:
                for m in METRICS:
                    cell = rec[sp][r] if sp in rec else None
                    v = cell.get(m) if isinstance(cell, dict) else None
                    if isinstance(v, (int, float)):
                        rows.append((f"{sp}/{m}", step, float(v), wall))
            if isinstance(rec.get("seconds"), (int, float)):
                rows.append(("time/pass_seconds", step, float(rec["seconds"]), wall))
        out[seed] = rows
    return out


def export_tensorboard(store, folder, ids=None) -> dict:
    from ..store import list_runs
    from .data import writable_folder
    event_pb2, summary_pb2, EventFileWriter = _tensorboard()
    runs = list_runs(store)
    if ids is not None:
        missing = sorted(set(ids) - {r["id"] for r in runs})
        if missing:
            raise UserError(f"no run {', '.join(map(str, missing))} in {store}")
        runs = [r for r in runs if r["id"] in ids]
    folder = writable_folder(folder)
    done, skipped, n_scalars = [], [], 0
    for run in runs:
        per_seed = scalars(run)
        if not per_seed:
            skipped.append(run["id"])
            continue
        for seed, rows in per_seed.items():
            logdir = folder / run_folder(run) / f"seed{seed}"
            try:
                logdir.mkdir(parents=True, exist_ok=True)
                for old in logdir.glob("events.out.tfevents.*"):   # a re-export replaces, never doubles
                    old.unlink()
                w = EventFileWriter(str(logdir))
                for tag, step, value, wall in rows:
                    ev = event_pb2.Event(wall_time=wall, step=step,
                                         summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                                             tag=tag, simple_value=value)]))
                    w.add_event(ev)
                w.close()
            except OSError as e:
                raise UserError(f"cannot write into {logdir}: {e.strerror or e}") from None
            n_scalars += len(rows)
        done.append({"id": run["id"], "folder": str(folder / run_folder(run)), "replicas": len(per_seed)})
    return {"dir": str(folder), "runs": done, "skipped_without_history": skipped, "scalars": n_scalars}


def _ids(text):
    if text is None:
        return None
    try:
        ids = {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise UserError(f"--runs {text!r}: expected comma-separated run ids") from None
    if not ids:
        raise UserError("--runs: give at least one run id")
    return ids


def cmd_export(args):
    if args.export_cmd != "tensorboard":
        raise UserError("backproplab export: choose tensorboard (see backproplab export --help)")
    rep = export_tensorboard(args.out, Path(args.dir), _ids(args.runs))
    n = len(rep["runs"])
    print(f"wrote {rep['scalars']} scalars of {n} run{'s' if n != 1 else ''} to {rep['dir']}"
          + (f" ({len(rep['skipped_without_history'])} runs without a per-pass history skipped)"
             if rep["skipped_without_history"] else "") + f"; view: tensorboard --logdir {rep['dir']}")
    if args.json:
        emit_json(rep)
    return 0


COMMANDS = {"export": cmd_export}
