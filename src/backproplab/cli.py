"""The command line: parses, calls a function, prints. Errors: one line on stderr, exit 2."""
import argparse
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .jsonout import emit_json as _emit_json

DEFAULT_OUT = "runs"


class _Parser(argparse.ArgumentParser):
    """One-line errors; and options, positionals and key=value overrides in any order, as people
    type them (`train modern --seeds 8 optim.lr=0.01 --quiet`): a command's own parser reads its
    arguments intermixed (argparse's parse_known_intermixed_args); a parser of subcommands (which
    argparse cannot intermix) hands everything after the subcommand's name to that parser."""
    _plain = False

    def error(self, message):  # one line, exit 2, no usage dump
        raise UserError(f"{self.prog}: {message}")

    def parse_known_args(self, args=None, namespace=None):
        if self._plain or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._plain = True  # parse_known_intermixed_args calls parse_known_args twice: those are plain
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._plain = False


def _add_common(p):
    p.add_argument("--json", action="store_true", help="last line of stdout is one JSON object")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder: results store and checkpoints "
                                                       f"(default ./{DEFAULT_OUT})")


def build_parser():
    ap = _Parser(prog="backproplab", description="Where deep-learning progress comes from, measured on digits.")
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("repro", help="the 1989 reproduction: 23 passes, per-example SGD, lr 0.03")
    _add_common(r)
    r.add_argument("--preset", default="lecun1989", help="config preset (lecun1989, smoke)")
    r.add_argument("--seeds", type=int, help="replicas trained at once (train.seeds)")
    r.add_argument("--seed", type=int, help="first seed (train.seed)")
    r.add_argument("--engine", help="fast (default), eager, or population with train.batch=B (train.engine)")
    r.add_argument("--passes", type=int, help="passes over the training set (train.passes)")
    r.add_argument("--data", help="mnist10k (embedded, default) or a folder of IDX files (data.source)")
    r.add_argument("--device", help="cpu or cuda; cuda needs --engine eager (train.device)")
    r.add_argument("--resume", action="store_true", help="continue the stopped run with this config in --out")
    r.add_argument("--quiet", action="store_true", help="no per-pass lines")
    r.add_argument("--smoke", action="store_true", help="test size: the preset's smoke preset (lecun1989: smoke, "
                                                        "500/200 digits, 2 passes)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    lad = sub.add_parser("ladder", help="the 1989 -> 2022 ladder, every rung on several seeds")
    _add_common(lad)
    lad.add_argument("--seeds", type=int, default=4, help="seeds per rung (default 4)")
    lad.add_argument("--rungs", help="comma-separated rungs (1,1b,2,3,4,5,6; default 1-5)")
    lad.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="rungs trained at once")
    lad.add_argument("--data", default="mnist10k", help="mnist10k (default) or a folder of IDX files")
    lad.add_argument("--smoke", action="store_true", help="test size: 300 training digits, 2 passes a rung")
    lad.add_argument("--engine", choices=("fast", "eager"), help="per-example engine (default fast)")
    lad.add_argument("--resume", action="store_true", help="skip finished rungs, continue stopped ones")
    ds = sub.add_parser("datascale", help="test error against training-set size, 1989 vs modern recipe")
    _add_common(ds)
    ds.add_argument("--data", default="mnist10k", help="mnist10k (default) or a folder of IDX files")
    ds.add_argument("--sizes", help="comma-separated training-set sizes (default 1k,2k,4k,7.3k,15k,30k,50k, "
                                    "capped by the data)")
    ds.add_argument("--recipes", default="1989,modern", help="1989, modern or both (default)")
    ds.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    ds.add_argument("--passes", type=int, help="passes per cell (default 100 for 1989, 80 for modern)")
    ds.add_argument("--n-test", type=int, help="use the first n test examples (default all)")
    ds.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cells trained at once")
    ds.add_argument("--smoke", action="store_true", help="test size: sizes 200,400, 2 passes, 500 test digits")
    ds.add_argument("--engine", choices=("fast", "eager"), help="per-example engine (default fast)")
    ds.add_argument("--resume", action="store_true", help="skip finished cells, continue stopped ones")
    doc = sub.add_parser("doctor", help="check the environment, the data and an output folder")
    _add_common(doc)
    doc.add_argument("--data", help="also check this folder of IDX files")
    doc.add_argument("--store", help="check this results store instead of --out's: a folder or "
                                     "postgresql+psycopg://USER@HOST:PORT/DB (read only)")
    s = sub.add_parser("runs", help="list the results store, one line per run (--csv, --json: every field)")
    _add_common(s)
    s.add_argument("--csv", nargs="?", const="-", metavar="FILE",
                   help="every run as one CSV row: id, created, kind, name, status and the summary's fields "
                        "(nested ones, e.g. per-seed lists, are in --json); to FILE, or stdout")
    for mod in _command_modules():
        mod.register(sub, _add_common)
    return ap


# Larger command groups live in backproplab/commands/<name>.py, each with
# register(sub, add_common) adding its parsers and COMMANDS = {name: handler(args) -> exit code}.
# Every module of that package is a command group (found, not listed), in name order;
# a module whose name starts with "_" is a helper, not a group.
def _command_modules():
    import importlib
    import pkgutil

    from . import commands
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"backproplab.commands.{n}") for n in names]




def cmd_repro(args):
    from .config import apply_overrides, preset, smoke_preset
    cfg = smoke_preset(args.preset) if args.smoke else preset(args.preset)
    flags = {"train.seeds": args.seeds, "train.seed": args.seed, "train.engine": args.engine,
             "train.passes": args.passes, "data.source": args.data, "train.device": args.device}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = apply_overrides(cfg, overrides)  # config errors surface before torch is imported
    return train_and_record(cfg, args, "repro")


def train_and_record(cfg, args, kind: str, published: bool = True, extra: dict | None = None) -> int:
    """Train cfg with a progress bar and per-pass lines, record the run in the store of args.out,
    print the result table; exit 0, or 3 for a diverged run (one 'error:' line)."""
    from .engine.train import environment, train
    from .report.console import repro_table
    from .report.progress import ProgressBar
    from .store import add_run, check_store, recorded_run
    check_store(args.out)  # a foreign or damaged runs.db is refused before training, not after
    bar = ProgressBar(cfg.train.passes)

    def log(line):  # printed above the bar
        if not args.quiet:
            print(line, flush=True)

    try:
        result = train(cfg, out=args.out, resume=args.resume, log=log, progress=bar)
    finally:
        bar.clear()
    summary = {**result.summary(), **(extra or {})}
    # --resume of a run that was already final trains nothing: keep its one record
    run_id = recorded_run(args.out, kind, summary["config_digest"], result.status) if args.resume else None
    if run_id is None:
        run_id = add_run(args.out, kind, cfg.name, result.status, result.config, summary, result.history,
                         environment())
    summary["run_id"] = run_id
    if not args.quiet:
        print(repro_table(result, published=published))
    if result.status != "finished":
        print(f"error: {result.message}; stored as run {run_id} with status {result.status}", file=sys.stderr)
    if args.json:
        _emit_json(summary)
    return 0 if result.status == "finished" else 3


def cmd_runs(args):
    from .store import list_runs
    runs = list_runs(args.out)
    if args.csv is not None:
        text = runs_csv(runs)
        if args.csv == "-":
            sys.stdout.write(text)
        else:
            from .engine.checkpoint import atomic_write_bytes
            try:
                atomic_write_bytes(Path(args.csv), text.encode())
            except OSError as e:
                raise UserError(f"--csv {args.csv}: cannot write: {e.strerror or e}") from None
            print(f"wrote {len(runs)} runs to {args.csv}", file=sys.stderr if args.json else sys.stdout)
    else:
        print(runs_table(runs))
    if args.json:
        _emit_json({"runs": [{k: r[k] for k in ("id", "created", "kind", "name", "status", "summary")}
                             for r in runs]})
    return 0


RUN_COLUMNS = ("id", "created", "kind", "name", "status")


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def runs_csv(runs) -> str:
    """One CSV row per run: RUN_COLUMNS (created as ISO 8601 UTC), then every scalar field any
    run's summary has, in name order (empty where a run lacks it)."""
    import csv
    import io
    keys = sorted({k for r in runs for k, v in r["summary"].items() if _scalar(v)} - set(RUN_COLUMNS))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*RUN_COLUMNS, *keys])
    for r in runs:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created"]))
        s = r["summary"]
        w.writerow([r["id"], when, r["kind"], r["name"], r["status"],
                    *["" if not _scalar(s.get(k)) or s.get(k) is None else s[k] for k in keys]])
    return buf.getvalue()


def runs_table(runs) -> str:
    from .report.console import render, table

    def pct(v):
        return f"{v:.2f}%" if isinstance(v, (int, float)) else ""

    rows = []
    for r in runs:
        s = r["summary"]
        secs = s.get("seconds")
        rows.append((r["id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])), r["kind"], r["name"],
                     r["status"], s.get("engine", ""), s.get("seeds", ""), s.get("passes", ""),
                     pct(s.get("train_error")), pct(s.get("test_error")),
                     f"{secs:.1f}" if isinstance(secs, (int, float)) else ""))
    cols = [("id", "right"), "created", "kind", "name", "status", "engine", ("seeds", "right"),
            ("passes", "right"), ("train error", "right"), ("test error", "right"), ("seconds", "right")]
    return render(table(cols, rows)) if runs else "no runs in this store"


def cmd_ladder(args):
    from .experiments.ladder import parse_rungs
    rungs = parse_rungs(args.rungs)
    if args.seeds < 1 or args.jobs < 1:
        raise UserError("--seeds and --jobs must be >= 1")
    from .experiments.ladder_report import run_and_report
    from .store import check_store
    check_store(args.out)
    summary = run_and_report(rungs, args.seeds, args.out, args.resume, args.jobs, args.smoke, args.data,
                             engine=args.engine)
    if args.json:
        _emit_json(summary)
    return 0 if all(r["status"] == "finished" for r in summary["rungs"]) else 3


def cmd_datascale(args):
    if args.seeds < 1 or args.jobs < 1 or (args.passes is not None and args.passes < 1):
        raise UserError("--seeds, --jobs and --passes must be >= 1")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    from .engine.train import environment, prepare_out
    from .experiments.datascale import format_table, run_datascale
    from .report import plots
    from .store import add_run, check_store
    check_store(args.out)
    out = prepare_out(args.out)
    cfgs, results, rows = run_datascale(args.data, args.sizes, recipes, args.seeds, args.passes, args.n_test,
                                        out, args.resume, args.jobs, args.smoke, engine=args.engine)
    env = environment()
    for key, res in results.items():
        add_run(out, "datascale", cfgs[key].name, res.status, res.config, res.summary(), res.history, env)
    print(format_table(rows))
    series = {}
    for rec in recipes:
        rr = [r for r in rows if r["recipe"] == rec]
        series[f"{rec} recipe"] = ([r["n_train"] for r in rr], [r["test_error"] for r in rr],
                                   [r["test_error_std"] for r in rr])
    (out / "datascale").mkdir(exist_ok=True)
    png = plots.loglog_errorbars(series, out / "datascale" / "test_error_vs_size.png", "training examples",
                                 "test error (%)", f"data scaling on {args.data} ({args.seeds} seeds)")
    if png:
        print(f"wrote {png}")
    if args.json:
        _emit_json({"rows": rows, "plot": str(png) if png else None})
    return 0 if all(r["status"] == "finished" for r in rows) else 3


def cmd_doctor(args):
    from .doctor import run_doctor
    from .report.console import render, table
    checks = run_doctor(args.out, data=args.data, store=args.store)
    print(render(table(["", "check", "detail"], [["ok" if c["ok"] else "FAIL", c["check"], c["detail"]]
                                                 for c in checks])))
    if args.json:
        _emit_json({"checks": checks, "ok": all(c["ok"] for c in checks)})
    return 0 if all(c["ok"] for c in checks) else 1


COMMANDS = {"repro": cmd_repro, "doctor": cmd_doctor, "ladder": cmd_ladder, "datascale": cmd_datascale, "runs": cmd_runs}


def _all_commands() -> dict:
    cmds = dict(COMMANDS)
    for mod in _command_modules():
        cmds.update(mod.COMMANDS)
    return cmds


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        from .report import progress
        progress.configure(quiet=bool(getattr(args, "json", False) or getattr(args, "quiet", False)))
        commands = _all_commands()
        if not args.command:
            raise UserError("backproplab: choose a command: " + ", ".join(commands) + " (see --help)")
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished passes are checkpointed (rerun with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a user sees one line; BACKPROPLAB_DEBUG=1 shows the traceback
        if os.environ.get("BACKPROPLAB_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (set BACKPROPLAB_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
    finally:
        _end_progress()


def _end_progress():
    """No bar outlives its command, however it ended (the terminal gets its cursor back)."""
    mod = sys.modules.get("backproplab.report.progress")
    if mod is not None:
        mod.close_all()


def entry():
    sys.exit(main())
