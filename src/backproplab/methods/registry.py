"""The methods registry: what each training method is, what it touches, when it runs.

A Method is a descriptor (pure data: name, kind, touches, hook points, options with
defaults and units, card text, incompatibilities, the oracle its test uses) plus the
dotted path of its switch class, imported only when a run is built. Family modules
(optimizers, gradients, schedules, averaging, regularizers, augment, structure,
distill, pruning) call
register(); the order of registration is each method's rank: inside one hook point,
methods run in rank order. A config carries methods as MethodSpec(name, options);
resolve() fills every option's default so '+method=sam' and '+method=sam:rho=0.05' are
the same config with the same digest.

HOOKS is the one place the loop's order is written down (engine/population.py runs it):
  build          once, before training: model-structure methods edit the ModNet spec
  pass_start     once a pass: draw the (seed, pass) random streams, input statistics
  lr             every step: schedules set the step's learning rate (multiplier chain)
  batch          every step: data methods transform the (B, 1, 16, 16) batch
  forward        every step: wrappers around the forward pass (autocast, noise in the model)
  loss           every step: criterion and penalties on the batch loss
  after_backward every step: gradient methods edit the flat gradient (AGC)
  before_step    every step: decoupled weight decay, on the weights before the update
  step           every step: the one optimizer (SAM wraps it with a second gradient)
  after_step     every step: weight averages that follow every step (EMA)
  pass_end       once a pass: per-pass averages (SWA)
  eval           at evaluation: which weights are evaluated (SWA/EMA, BatchNorm recomputed)
"""
import dataclasses
import importlib
import textwrap
from dataclasses import dataclass, field

from ..config import MethodSpec
from ..errors import UserError

HOOKS = ("build", "pass_start", "lr", "batch", "forward", "loss", "after_backward", "before_step", "step",
         "after_step", "pass_end", "eval")
TOUCHES = ("data", "model", "loss", "gradients", "optimizer", "schedule", "weights-after-step")
KINDS = ("optimizer", "schedule", "averaging", "regularizer", "augmentation", "normalization", "depth",
         "precision", "pruning", "compression", "distillation")
# new families go at the end: a method's rank keys its random streams, so earlier ranks never move
FAMILIES = ("optimizers", "gradients", "schedules", "averaging", "regularizers", "augment", "structure",
            "distill", "pruning", "optimizers_late", "qat")


@dataclass(frozen=True)
class Option:
    default: object                  # int, float, str or bool; its type is the option's type
    unit: str = ""                   # e.g. "per step", "fraction of passes", "pixels"
    help: str = ""
    lo: float | None = None          # inclusive range for numbers
    hi: float | None = None
    choices: tuple = ()

    def parse(self, method: str, key: str, value):
        tp = type(self.default)
        try:
            if isinstance(value, str):
                if tp is bool:
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError
                    value = value.lower() in ("true", "1")
                else:
                    value = tp(value)
            elif tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise ValueError
            if tp is float and (value != value or abs(value) == float("inf")):
                raise ValueError
        except ValueError:
            raise UserError(f"method {method}: option {key}={value!r}: expected {tp.__name__}") from None
        if self.choices and value not in self.choices:
            raise UserError(f"method {method}: option {key}={value!r}: choose one of "
                            f"{', '.join(map(str, self.choices))}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise UserError(f"method {method}: option {key}={value}: must be in [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    touches: tuple
    hooks: tuple
    summary: str                     # one line for the table
    what: str                        # the card's paragraph: the maths, where it acts
    paper: str                       # source
    oracle: str                      # what tests/test_methods_oracle.py compares it with
    impl: str                        # "module:Class" of the switch, relative to backproplab.methods
    options: dict = field(default_factory=dict)          # name -> Option
    slot: str | None = None          # at most one method per slot: optimizer, schedule, norm, precision, average
    incompatible_with: dict = field(default_factory=dict)  # other method -> why
    requires: tuple = ()             # at least one of these methods must be present
    modnet: bool = False             # changes the model: needs model.name=net1989 (built as a ModNet)
    autograd: bool = False           # needs autograd (a loss term, a number format the fused kernels lack)
    fast_model: tuple = ()           # the fast paths that compute its model change too (engine/population.py)
    fast_paths: tuple = ("kernel", "fused")  # a non-model method: the fast paths that compute it (lwf: kernel)
    interactions: str = ""
    check: object = None             # check(cfg, options) -> message or None: clashes with config fields
    rank: int = 0

    @property
    def fast_on(self) -> tuple:
        """The fast paths (kernel, fused) that can run it: none when it needs autograd; for a model
        change the paths that compute it (fast_model: no-op, H2-output dropout, scaled weight
        standardization, spatial dropout, DropConnect: engine/population.py); else fast_paths
        (both, or a loss term only the kernels add)."""
        if self.autograd:
            return ()
        return self.fast_model if self.modnet else self.fast_paths

    @property
    def fast(self) -> bool:
        """Runs on at least one of the population engine's fast paths."""
        return bool(self.fast_on)

    def runs_on(self, path: str) -> bool:
        """Whether the fast path `path` (kernel or fused) can run it."""
        return path in self.fast_on

    def card(self) -> str:
        lines = [f"{self.name}  ({self.kind}; touches {', '.join(self.touches)})", "", self.summary, ""]
        lines += textwrap.wrap(self.what, 88)
        lines += ["", "When it runs: " + ", ".join(f"{h} (hook {HOOKS.index(h) + 1} of {len(HOOKS)})"
                                                   for h in self.hooks)
                  + f"; rank {self.rank} (the order inside a hook)"]
        if self.options:
            lines.append("Options (defaults):")
            for k, o in self.options.items():
                rng = f" in [{o.lo}, {o.hi}]" if o.lo is not None or o.hi is not None else ""
                ch = f" one of {'|'.join(map(str, o.choices))}" if o.choices else ""
                lines.append(f"  {k} = {o.default!r}  {o.unit}{rng}{ch}  {o.help}".rstrip())
        else:
            lines.append("Options: none")
        inter = []
        if self.slot:
            inter.append(f"one {self.slot} per run: replaces any other {self.slot} method")
        if self.requires:
            inter.append(f"needs one of: {', '.join(self.requires)}")
        if self.modnet:
            inter.append("changes the model: needs model.name=net1989 (built as ModNet)")
        why = "needs autograd" if self.autograd else "changes the model"
        paths = [{"kernel": "numba kernels", "fused": "fused products"}[p] for p in self.fast_on]
        inter.append(f"allows the fast path{'s' if len(paths) > 1 else ''} ({', '.join(paths)})" if self.fast
                     else f"runs on the autograd path ({why})")
        inter += [f"not with {k}: {v}" for k, v in self.incompatible_with.items()]
        if self.interactions:
            inter += textwrap.wrap(self.interactions, 86)
        lines.append("Interactions:")
        lines += [f"  {s}" for s in inter] or ["  none known"]
        lines += ["Source: " + self.paper, "Tested against: " + self.oracle]
        return "\n".join(lines)


_REGISTRY: dict = {}
_PENDING: dict = {}   # family -> its methods in registration order, until _load() ranks them
_LOADED = False


def register(m: Method) -> Method:
    assert m.kind in KINDS and set(m.touches) <= set(TOUCHES) and set(m.hooks) <= set(HOOKS), m.name
    family = m.impl.split(":")[0]
    assert family in FAMILIES and m.name not in [p.name for p in _PENDING.get(family, [])], m.name
    _PENDING.setdefault(family, []).append(m)
    return m


def _load():
    # ranks follow FAMILIES, then the order inside each file, whatever imported a family first
    global _LOADED
    if not _LOADED:
        for fam in FAMILIES:
            importlib.import_module(f"backproplab.methods.{fam}")
        for fam in FAMILIES:
            for m in _PENDING[fam]:
                assert m.name not in _REGISTRY, m.name
                _REGISTRY[m.name] = dataclasses.replace(m, rank=len(_REGISTRY))
        _symmetrize()
        _LOADED = True


def _symmetrize():
    # an incompatibility declared on one side holds on both
    for m in list(_REGISTRY.values()):
        for other, why in m.incompatible_with.items():
            assert other in _REGISTRY, (m.name, other)
            o = _REGISTRY[other]
            if m.name not in o.incompatible_with:
                _REGISTRY[other] = dataclasses.replace(o, incompatible_with={**o.incompatible_with, m.name: why})


def list_methods() -> list:
    """All registered methods in rank order (the order they run in within a hook point)."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda m: m.rank)


def get_method(name: str) -> Method:
    _load()
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; known: {', '.join(m.name for m in list_methods())}")
    return _REGISTRY[name]


def parse_method(text: str) -> MethodSpec:
    """'sam' or 'sam:rho=0.1,adaptive=false' -> MethodSpec with every option resolved."""
    name, _, rest = text.strip().partition(":")
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise UserError(f"method {name}: option {item!r} is not key=value")
        k, v = item.split("=", 1)
        opts[k.strip()] = v.strip()
    return resolve(MethodSpec(name.strip(), opts))


def resolve(spec: MethodSpec) -> MethodSpec:
    m = get_method(spec.name)
    unknown = sorted(set(spec.options) - set(m.options))
    if unknown:
        known = ", ".join(m.options) or "none"
        raise UserError(f"method {m.name}: unknown option {unknown[0]!r}; options: {known}")
    opts = {k: o.parse(m.name, k, spec.options.get(k, o.default)) for k, o in m.options.items()}
    return MethodSpec(m.name, dict(sorted(opts.items())))


def incompatibility(a: str, b: str) -> str | None:
    """Why methods a and b cannot run together, or None."""
    ma, mb = get_method(a), get_method(b)
    if a == b:
        return "given twice"
    if ma.slot and ma.slot == mb.slot:
        return f"both are the run's {ma.slot}"
    return ma.incompatible_with.get(b) or mb.incompatible_with.get(a)


def check_config(cfg) -> None:
    """Resolve cfg.methods in place (rank order, all options) and reject bad combinations."""
    specs = [resolve(s if isinstance(s, MethodSpec) else MethodSpec(**s)) for s in cfg.methods]
    names = [s.name for s in specs]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            why = incompatibility(a, b)
            if why:
                raise UserError(f"methods {a} and {b} are incompatible: {why}")
    if cfg.train.engine == "population" and not any(get_method(n).slot == "optimizer" for n in names):
        implicit = get_method(cfg.optim.name)  # optim.name is the optimizer when no method replaces it
        for n in names:
            why = incompatibility(implicit.name, n)
            if why:
                raise UserError(f"optim.name={implicit.name} and method {n} are incompatible: {why}")
        why = implicit.check(cfg, {}) if implicit.check else None
        if why:
            raise UserError(f"optim.name={implicit.name}: {why}")
    for s in specs:
        m = get_method(s.name)
        if m.requires and not set(m.requires) & set(names):
            raise UserError(f"method {s.name} needs one of: {', '.join(m.requires)}")
        if m.modnet and cfg.model.name != "net1989":
            raise UserError(f"method {s.name} changes the model and needs model.name=net1989, "
                            f"not {cfg.model.name}")
        why = m.check(cfg, s.options) if m.check else None
        if why:
            raise UserError(f"method {s.name}: {why}")
    if specs and cfg.train.engine != "population":
        raise UserError(f"methods ({', '.join(names)}) need train.engine=population, not {cfg.train.engine}")
    cfg.methods = sorted(specs, key=lambda s: get_method(s.name).rank)


def with_method(cfg, spec):
    """A copy of cfg plus one method that takes over what it replaces: a method of the same slot
    (optimizer, schedule, norm, precision, average), and the config fields doing the same job
    (a schedule or schedule_free clears optim.lr_end, dropout clears model.dropout, shift clears train.shift).
    Not validated: call config.validate on the result."""
    import copy
    spec = parse_method(spec) if isinstance(spec, str) else resolve(spec)
    m = get_method(spec.name)
    out = copy.deepcopy(cfg)
    out.methods = [s for s in out.methods if not (m.slot and get_method(s.name).slot == m.slot)
                   and s.name != spec.name] + [spec]
    out.train.engine = "population"
    if m.slot == "schedule" or m.name == "schedule_free":
        out.optim.lr_end = None
    if m.name == "dropout":
        out.model.dropout = 0.0
    if m.name == "shift":
        out.train.shift = 0
    return out


def build_switch(spec: MethodSpec, **ctx):
    """Instantiate the switch of a resolved spec: Class(options, **ctx)."""
    m = get_method(spec.name)
    mod, cls = m.impl.split(":")
    return getattr(importlib.import_module(f"backproplab.methods.{mod}"), cls)(dict(spec.options), **ctx)
