"""Search spaces: what a search varies, parsed from the command line or a small file, checked
against a preset's config and the methods registry before any trial runs.

Items (command line, or the values of a JSON / TOML / YAML mapping KEY -> SPEC):
  optim.lr=log:1e-4:1e-1        log-uniform (an int key gives log-uniform integers)
  optim.lr=1e-3:1e-2            uniform (an int key gives integers)
  train.batch=int:16:64         integers, uniform
  model.act=choice:tanh,relu    one of these values
  train.passes=3                fixed: the same override in every trial
  +method=label_smoothing:eps=0:0.3      a method in every trial, its options searched (several:
  +method=sam:rho=log:0.01:0.2,adaptive=choice:true,false   comma-separated) or fixed
  methods=choice:sam,ema,none   one of these methods added (with its defaults) or none
A Dim's name is the Optuna parameter's: the config key, "+NAME.OPTION" or "methods".
"""
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, _base_type, _parse, apply_overrides, set_value, validate
from ..errors import UserError

NOT_SEARCHABLE = {"data.val": "the search sets the validation split itself (--val)",
                  "train.seeds": "trials train one seed (--seeds is for the re-training of the best)",
                  "train.seed": "a search trial's seed is fixed; --seeds re-trains the best on several"}


@dataclass(frozen=True)
class Dim:
    name: str                      # Optuna parameter name
    kind: str                      # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    item: str = ""                 # the item it came from, for messages

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return CategoricalDistribution(list(self.choices))

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def extremes(self) -> list:
        return [self.low, self.high] if self.kind != "choice" else list(self.choices)

    def grid(self, points: int) -> list:
        """Values a grid search takes: every choice, every integer (at most `points`, spread), or
        `points` values spread evenly (log-evenly for a log range) over a float range."""
        if self.kind == "choice":
            return list(self.choices)
        lo, hi = self.low, self.high
        if self.kind == "int" and hi - lo + 1 <= points:
            return list(range(int(lo), int(hi) + 1))
        if self.log:
            vals = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * k / (points - 1)) for k in range(points)]
        else:
            vals = [lo + (hi - lo) * k / (points - 1) for k in range(points)]
        if self.kind == "int":
            return sorted({int(round(v)) for v in vals})
        return [float(f"{v:.6g}") for v in vals]


@dataclass
class Space:
    dims: list                     # Dim each, in the order given
    fixed: list                    # overrides for every trial ("train.passes=3", "+method=sam:rho=0.1")
    methods: list                  # (method name, {option: Dim or fixed text}) for each +method item

    def canonical(self) -> dict:
        """A JSON-able description; the same space (in any order of its dimensions) gives the same one."""
        return {"dims": sorted(({k: v for k, v in dataclasses.asdict(d).items() if k != "item"}
                                | {"choices": list(d.choices)} for d in self.dims), key=lambda d: d["name"]),
                "fixed": list(self.fixed),
                "methods": [[n, {k: (v if isinstance(v, str) else v.name) for k, v in o.items()}]
                            for n, o in self.methods]}

    def config(self, base: Config, params: dict) -> Config:
        """The trial's config: base + the fixed overrides + the parameter values (validated)."""
        import copy
        cfg = copy.deepcopy(base)
        items = list(self.fixed)
        for name, opts in self.methods:
            parts = [f"{k}={v if isinstance(v, str) else _text(params[v.name])}" for k, v in opts.items()]
            items.append(f"+method={name}" + (":" + ",".join(parts) if parts else ""))
        for d in self.dims:
            if d.name.startswith("+"):
                continue
            if d.name == "methods":
                continue
            items.append(f"{d.name}={_text(params[d.name])}")
        cfg = apply_overrides(cfg, items)
        chosen = params.get("methods") if any(d.name == "methods" for d in self.dims) else None
        if chosen is not None and chosen != "none":
            from ..methods.registry import with_method
            cfg = validate(with_method(cfg, chosen))
        return cfg

    def params_at(self, pick) -> dict:
        return {d.name: pick(d) for d in self.dims}


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def _number(item: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"search space {item!r}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise UserError(f"search space {item!r}: {text!r} is not a finite number")
    return v


def _range_dim(item: str, name: str, spec: str, tp, parse_value) -> Dim | None:
    """A Dim for a range or choice spec, None for a fixed value. tp: the value's type."""
    if spec.startswith("choice:"):
        vals = [v.strip() for v in spec[len("choice:"):].replace("|", ",").split(",") if v.strip()]
        if not vals:
            raise UserError(f"search space {item!r}: empty choice")
        parsed = [parse_value(v) for v in vals]
        if len(set(map(repr, parsed))) != len(parsed):
            raise UserError(f"search space {item!r}: a value is listed twice")
        return Dim(name, "choice", choices=tuple(parsed), item=item)
    parts = spec.split(":")
    log = False
    kind = "int" if tp is int else "float"
    if parts[0] in ("log", "int", "float"):
        head = parts.pop(0)
        log = head == "log"
        if head == "int":
            kind = "int"
        if parts and parts[0] == "log":
            parts.pop(0)
            log = True
        if len(parts) != 2:
            raise UserError(f"search space {item!r}: expected {head}:LOW:HIGH")
    elif len(parts) != 2:
        return None
    if tp not in (int, float):
        raise UserError(f"search space {item!r}: {name} is a {tp.__name__}; search it with choice:a,b")
    lo, hi = (_number(item, p) for p in parts)
    if kind == "int":
        if lo != int(lo) or hi != int(hi):
            raise UserError(f"search space {item!r}: integer bounds expected")
        lo, hi = int(lo), int(hi)
    if not lo < hi:
        raise UserError(f"search space {item!r}: empty range ({parts[0]} is not below {parts[1]})")
    if log and lo <= 0:
        raise UserError(f"search space {item!r}: a log range needs LOW > 0")
    return Dim(name, kind, lo, hi, log, item=item)


def _field_type(base: Config, key: str):
    import copy
    section, dot, name = key.partition(".")
    sec = getattr(base, section, None)
    fields = {f.name: f for f in dataclasses.fields(sec)} if dot and dataclasses.is_dataclass(sec) else {}
    if name not in fields:
        set_value(copy.deepcopy(base), key, "0")  # raises the house's unknown-key message
        raise UserError(f"unknown config key {key!r}")
    return _base_type(fields[name].type)[0]


def parse_space(items, base: Config) -> Space:
    """Parse and check items against the base config; raises UserError (one line) on any bad item."""
    from ..methods.registry import get_method
    dims, fixed, methods = [], [], []
    for raw in items:
        item = raw.strip()
        if "=" not in item:
            raise UserError(f"search space {item!r} is not KEY=SPEC (e.g. optim.lr=log:1e-4:1e-1)")
        key, spec = (s.strip() for s in item.split("=", 1))
        if key == "+method":
            name, _, rest = spec.partition(":")
            m = get_method(name.strip())
            opts = {}
            for tok in _option_tokens(item, rest):
                k, v = (s.strip() for s in tok.split("=", 1))
                if k not in m.options:
                    raise UserError(f"search space {item!r}: method {m.name} has no option {k!r}; "
                                    f"it has: {', '.join(m.options) or 'none'}")
                opt = m.options[k]
                d = _range_dim(item, f"+{m.name}.{k}", v, type(opt.default),
                               lambda t, o=opt, k=k: o.parse(m.name, k, t))
                if d is None:
                    opt.parse(m.name, k, v)
                    opts[k] = v
                else:
                    for val in d.extremes():
                        opt.parse(m.name, k, val)
                    dims.append(d)
                    opts[k] = d
            methods.append((m.name, opts))
            continue
        if key == "methods":
            if not spec.startswith("choice:"):
                raise UserError(f"search space {item!r}: methods are searched as methods=choice:a,b,none")
            d = _range_dim(item, "methods", spec, str, lambda t: t if t == "none" else get_method(t).name)
            dims.append(d)
            continue
        if key in NOT_SEARCHABLE:
            raise UserError(f"search space {item!r}: {key} cannot be searched: {NOT_SEARCHABLE[key]}")
        tp = _field_type(base, key)
        d = _range_dim(item, key, spec, tp, lambda t, k=key, tp=tp: _parse(k, t, _field_for(base, k)))
        if d is None:
            fixed.append(f"{key}={spec}")
        else:
            dims.append(d)
    names = [d.name for d in dims]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"search space: {', '.join(dup)} given twice")
    space = Space(dims, fixed, methods)
    check_space(space, base)
    return space


def _field_for(base: Config, key: str):
    section, _, name = key.partition(".")
    return {f.name: f for f in dataclasses.fields(getattr(base, section))}[name].type


def _option_tokens(item: str, rest: str) -> list:
    """'eps=0:0.3,n=choice:1,2' -> ['eps=0:0.3', 'n=choice:1,2']: a piece without '=' continues a choice."""
    toks = []
    for piece in (p.strip() for p in rest.split(",")):
        if not piece:
            continue
        if "=" in piece:
            toks.append(piece)
        elif toks and "choice:" in toks[-1]:
            toks[-1] += "," + piece
        else:
            raise UserError(f"search space {item!r}: option {piece!r} is not OPTION=SPEC")
    return toks


def check_space(space: Space, base: Config) -> None:
    """Every dimension at each end (each choice), the others at their first value: each must be a
    valid config, so a bad key, option or combination stops the search before any trial."""
    first = space.params_at(lambda d: d.extremes()[0])
    probes = [first] + [{**first, d.name: v} for d in space.dims for v in d.extremes()[1:]]
    probes.append(space.params_at(lambda d: d.extremes()[-1]))
    for params in probes:
        try:
            space.config(base, params)
        except UserError as e:
            where = ", ".join(f"{k}={_text(v)}" for k, v in params.items()) or "the fixed overrides"
            raise UserError(f"search space: {e} (at {where})") from None


def load_space_file(path) -> list:
    """A JSON, TOML or YAML mapping KEY -> SPEC (a string as on the command line, a number or
    string for a fixed value, a list for a choice; '+method' and 'methods' take a string or a list)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml", ".yaml", ".yml"):
        raise UserError(f"--space {path}: expected a .json, .toml or .yaml file")
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--space {path}: {e.strerror or e}") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise UserError("a YAML search space needs PyYAML: pip install pyyaml (or use .json / .toml)") from None
            data = yaml.safe_load(text)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - each parser has its own error type; one line names the file
        raise UserError(f"--space {path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"--space {path}: expected a non-empty mapping KEY -> SPEC")
    items = []
    for key, val in data.items():
        if key == "+method":
            for v in val if isinstance(val, list) else [val]:
                items.append(f"+method={v}")
        elif isinstance(val, list):
            items.append(f"{key}=choice:{','.join(_text(v) for v in val)}")
        elif isinstance(val, (bool, int, float, str)):
            items.append(f"{key}={_text(val)}")
        else:
            raise UserError(f"--space {path}: {key}: expected a string, number or list")
    return items
