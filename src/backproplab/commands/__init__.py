"""Command groups: every module here is found by cli.py and adds its parsers (register) and handlers (COMMANDS)."""


def add_grid_args(p, unit: str, default_study: str, store_note: str) -> None:
    """--store, --storage, --study and --heartbeat of a command whose grid can go to the search
    workers (effects: its runs; scale run: its cells)."""
    p.add_argument("--store", help=f"results store: a folder or postgresql+psycopg://USER@HOST:PORT/DB ({store_note})")
    p.add_argument("--storage", help=f"hand the {unit}s to Optuna workers: a study journal file (one machine) or "
                                     "postgresql+psycopg://... (many machines: `backproplab search worker "
                                     f"--storage URL --study NAME` on each); each {unit} runs exactly once")
    p.add_argument("--study", help=f"with --storage: the grid study's name (default {default_study})")
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help=f"with a database --storage: seconds between a worker's heartbeats; a {unit} silent for 3x "
                        "this is retried by another worker (default 10)")
