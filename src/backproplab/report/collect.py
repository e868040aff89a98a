"""What the report reads: the runs of one or more results stores, and where each came from.

A Run is one store record (kind, name, status, config, summary, history, env) with the
folder of its store: checkpoints live beside the store, and provenance names it."""
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..store import DB_NAME, list_runs


@dataclass(frozen=True)
class Run:
    store: Path               # the output folder holding runs.db (checkpoints/ beside it)
    rec: dict = field(repr=False)

    @property
    def id(self) -> int:
        return int(self.rec["id"])

    @property
    def kind(self) -> str:
        return self.rec["kind"]

    @property
    def name(self) -> str:
        return self.rec["name"]

    @property
    def status(self) -> str:
        return self.rec["status"]

    @property
    def config(self) -> dict:
        return self.rec["config"] if isinstance(self.rec["config"], dict) else {}

    @property
    def summary(self) -> dict:
        return self.rec["summary"] if isinstance(self.rec["summary"], dict) else {}

    @property
    def history(self) -> list:
        return self.rec["history"] if isinstance(self.rec["history"], list) else []

    @property
    def env(self) -> dict:
        return self.rec["env"] if isinstance(self.rec["env"], dict) else {}

    @property
    def created(self) -> float:
        return float(self.rec["created"])

    def digest(self) -> str:
        s, c = self.summary, self.config
        if s.get("config_digest"):
            return str(s["config_digest"])
        if c.get("digest"):                      # a scaling cell: the study's digest
            return str(c["digest"])[:12]
        try:
            from ..config import from_dict
            return from_dict(c).digest()
        except (UserError, TypeError, ValueError, AttributeError, KeyError):
            return "-"

    def per_seed(self) -> list[dict]:
        """Per replica final figures (a one-seed run's summary is its own)."""
        s = self.summary
        return s["per_seed"] if isinstance(s.get("per_seed"), list) else [s]


class Context:
    """All runs of the stores, in store order then id order, plus caches the sections share."""

    def __init__(self, stores: list[Path], runs: list[Run]):
        self.stores, self.runs, self.memo = stores, runs, {}

    @classmethod
    def load(cls, stores) -> "Context":
        folders, runs = [], []
        for s in stores:
            p = Path(s)
            folder = p.parent if p.is_file() or p.name == DB_NAME else p
            if folder in folders:
                continue
            folders.append(folder)
            runs += [Run(folder, r) for r in list_runs(p)]   # UserError: missing, foreign or damaged store
        return cls(folders, runs)

    def of(self, *kinds) -> list[Run]:
        return [r for r in self.runs if r.kind in kinds]

    def kind_counts(self) -> dict:
        out = {}
        for r in self.runs:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def cached(self, key, make):
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def dataset(self, source: str, n_train, n_test, val=0, resolution=16):
        """The run's data as training saw it (None if the source is gone: a deleted IDX folder)."""
        def load():
            from ..data import load_dataset
            try:
                d = load_dataset(source, n_train, n_test, resolution=resolution)
                return d.with_validation(val) if val else d
            except (UserError, OSError, ValueError):
                return None
        return self.cached(("data", source, n_train, n_test, val, resolution), load)


# How the runs of a kind were made: the command, filled in from the record.
def command_of(run: Run) -> str:
    c, s, k = run.config, run.summary, run.kind
    seeds = (c.get("train") or {}).get("seeds") or s.get("seeds")
    smoke = "smoke" in run.name
    if k == "repro":
        return f"backproplab repro --preset {c.get('name', '?')} --seeds {seeds}"
    if k == "train":
        return f"backproplab train {c.get('name', '?')} --seeds {seeds}"
    if k == "ladder":
        return f"backproplab ladder --seeds {seeds}" + (" --smoke" if smoke else "")
    if k in ("effects", "effects-run"):
        base = (s.get("base") or c.get("name", "?").split("+")[0]).removesuffix("_smoke")
        return f"backproplab effects --base {base} --seeds {seeds}" + (" --smoke" if smoke else "")
    if k == "scale":
        return f"backproplab scale run --family {c.get('family', s.get('family', '?'))}"
    if k == "scale_fit":
        return f"backproplab scale fit {run.store / DB_NAME} --n-boot {c.get('n_boot', '?')}"
    if k == "datascale":
        src = (c.get("data") or {}).get("source", "mnist10k")
        return f"backproplab datascale --data {src} --seeds {seeds}" + (" --smoke" if smoke else "")
    if k == "progress" and s.get("recipes"):
        return f"backproplab progress --recipes {','.join(s['recipes'])} --seeds {s.get('seeds')}" + \
            (" --smoke" if s.get("smoke") else "")
    return f"backproplab {k}"


def _span(ids: list[int]) -> str:
    ids = sorted(set(ids))
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(parts)


def _versions(env: dict) -> str:
    keys = ("backproplab", "torch", "numpy", "numba", "python")
    got = [f"{k} {env[k]}" for k in keys if env.get(k)]
    return ", ".join(got) if got else "versions not recorded"


def provenance(runs) -> list[dict]:
    """One entry per (store, command, versions, git): the runs, digests and dates they share."""
    groups: dict = {}
    for r in runs:
        key = (str(r.store), command_of(r), _versions(r.env), r.env.get("git", "not recorded"))
        groups.setdefault(key, []).append(r)
    out = []
    for (store, command, versions, git), rs in groups.items():
        digests = sorted({r.digest() for r in rs})
        t = sorted(r.created for r in rs)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t[0]))
        if time.strftime("%Y%m%d%H%M", time.gmtime(t[-1])) != time.strftime("%Y%m%d%H%M", time.gmtime(t[0])):
            date += " to " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t[-1]))
        out.append({"store": store, "runs": sorted(r.id for r in rs),
                    "runs_text": ("run " if len(rs) == 1 else "runs ") + _span([r.id for r in rs]),
                    "command": command, "digests": ", ".join(digests[:6]) + (
                        f" and {len(digests) - 6} more" if len(digests) > 6 else ""),
                    "versions": versions, "git": git[:12] if git != "not recorded" else git, "date": date})
    return out
