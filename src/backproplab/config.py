"""Typed configuration: dataclasses, presets as functions, "section.key=value" overrides.

An unknown key, a wrong type or an out-of-range value is a UserError naming the key.
"""
import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field

from .errors import UserError


@dataclass
class DataCfg:
    source: str = "mnist10k"       # 'mnist10k' (embedded, canonical split) or a folder of IDX files
    n_train: int | None = None     # keep the first n training examples (None: all)
    n_test: int | None = None
    val: int = 0                   # the last `val` training examples held out as a validation split (0: none);
                                   # what is tuned, searched or stopped early is judged there, never on the test set
    resolution: int = 16           # input side in pixels: 16 (the 1989 digits), 20 or 28, resized from the 28x28
                                   # sources by the 1989 preprocessing; only model.name=convnet takes 20 or 28


@dataclass
class ModelCfg:
    name: str = "net1989"          # net1989 | vit (micro-ViT) | convnet (the scaling family) | ssm
                                   # | deep (models/deep.py: residual MLP or conv stacks, the ReZero study)
    act: str = "tanh"              # tanh | relu | scaled_tanh
    out_act: str = "tanh"          # tanh (1989) | none (logits)
    dropout: float = 0.0           # net1989: on the 192 H2 outputs, before H3; vit: on the pooled class token
    dim: int = 18                  # vit: token width (defaults: 9,766 params, 62,748 MACs ~ the 1989 net)
    depth: int = 2                 # vit: transformer blocks; convnet: the family's size knob (1-64);
                                   # deep: residual layers
    heads: int = 2                 # vit: attention heads
    patch: int = 8                 # vit: patch side in pixels (16x16 input, padded with -1 to a multiple)
    block: str = "plain"           # convnet: plain | separable | inverted_residual (models/convnet.py)
    width: int = 0                 # convnet: width 4 * width channels (0: 4 * depth, the family's default);
                                   # deep: the layers' width (0: 64 for mlp, 8 for conv)
    seq: str = "inorder"           # ssm: pixels read in order or in one fixed permutation (models/ssm.py)
    stack: str = "mlp"             # deep: mlp | conv
    norm: str = "rezero"           # deep: the residual block, none | batch | layer_pre | layer_post | rezero


@dataclass
class OptimCfg:
    name: str = "sgd"              # sgd | adamw | sdlm (the 1989 diagonal Levenberg-Marquardt)
    lr: float = 0.03               # per example (batch of one)
    lr_end: float | None = None    # linear decay from lr to lr_end over the run, per step (None: constant)
    weight_decay: float = 0.0      # decoupled (AdamW)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    mu: float = 0.02               # sdlm: step lr / (mu + h), h the running Gauss-Newton diagonal
    gamma: float = 0.01            # sdlm: running-average weight of each new estimate


@dataclass
class TrainCfg:
    passes: int = 23
    loss: str = "mse"              # mse (mean over 10 outputs, +-1 targets) | ce
    shift: int = 0                 # augmentation: random shifts of up to this many pixels, -1 fill
    engine: str = "fast"           # fast | eager (per example); population: every minibatch run (engine/population.py)
    batch: int = 1                 # examples per update
    seed: int = 0                  # replica k uses seed + k
    seeds: int = 1                 # replicas trained at once
    device: str = "cpu"            # eager engine only: cpu | cuda
    threads: int = 1
    eval_every: int = 1            # evaluate every k passes (and always after the last)
    eval_train: bool = True        # evaluate the training split each time (False: after the last pass only)
    eval_test: bool = True         # evaluate the test split each time (False: after the last pass only, so
                                   # nothing during training can look at it; needs data.val or eval_train)


@dataclass
class MethodSpec:
    name: str                      # a registered method (backproplab.methods.registry)
    options: dict = field(default_factory=dict)  # option -> value; validate() fills the defaults


@dataclass
class Config:
    name: str = "lecun1989"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    methods: list = field(default_factory=list)  # MethodSpec each, rank order after validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["methods"]:  # a config without methods keeps the digest it had before methods existed
            del d["methods"]
        if not d["data"]["val"]:  # likewise a config without a validation split
            del d["data"]["val"]
        if d["data"]["resolution"] == 16:  # ... or at the 1989 input side
            del d["data"]["resolution"]
        for key, default in (("block", "plain"), ("width", 0), ("seq", "inorder"), ("stack", "mlp"),
                             ("norm", "rezero")):  # ... or without these keys
            if d["model"][key] == default:
                del d["model"][key]
        if d["train"]["eval_train"]:  # ... and one that evaluates the training split every time
            del d["train"]["eval_train"]
        if d["train"]["eval_test"]:  # ... and the test split every time
            del d["train"]["eval_test"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


CHOICES = {
    "model.name": ("net1989", "vit", "convnet", "ssm", "deep"),
    "model.stack": ("mlp", "conv"),
    "model.norm": ("none", "batch", "layer_pre", "layer_post", "rezero"),
    "model.block": ("plain", "separable", "inverted_residual"),
    "model.seq": ("inorder", "permuted"),
    "model.act": ("tanh", "relu", "scaled_tanh"),
    "model.out_act": ("tanh", "scaled_tanh", "none"),
    "optim.name": ("sgd", "adamw", "sdlm"),
    "train.loss": ("mse", "ce"),
    "train.engine": ("fast", "eager", "population", "minibatch", "hooked"),  # the last two: old names of population
    "train.device": ("cpu", "cuda"),
}
RESOLUTIONS = (16, 20, 28)   # data.resolution: input sides the 28x28 sources are resized to
# (low, high, low inclusive): numeric ranges a value must fall in.
RANGES = {
    "data.n_train": (1, 10_000_000, True), "data.n_test": (1, 10_000_000, True), "data.val": (0, 10_000_000, True),
    "model.dropout": (0.0, 1.0, True),
    "optim.lr": (0.0, 100.0, False), "optim.lr_end": (0.0, 100.0, True),
    "optim.weight_decay": (0.0, 10.0, True), "optim.beta1": (0.0, 1.0, True),
    "optim.beta2": (0.0, 1.0, True), "optim.eps": (0.0, 1.0, False),
    "optim.mu": (0.0, 100.0, False), "optim.gamma": (0.0, 1.0, False),
    "train.passes": (1, 100_000, True), "train.shift": (0, 4, True),
    "train.seeds": (1, 4096, True), "train.batch": (1, 65536, True),
    "model.dim": (1, 4096, True), "model.depth": (1, 256, True), "model.heads": (1, 64, True),
    "model.patch": (1, 16, True), "train.seed": (0, 2**31 - 1, True), "train.threads": (1, 1024, True),
    "model.width": (0, 64, True),
    "train.eval_every": (1, 100_000, True),
}


def lecun1989() -> Config:
    """The 1989 paper: tanh everywhere, MSE on +-1 targets, per-example SGD lr 0.03, 23 passes."""
    return Config()


def smoke() -> Config:
    """lecun1989 at test size: 500 training and 200 test digits, 2 passes."""
    c = lecun1989()
    c.name = "smoke"
    c.data.n_train, c.data.n_test, c.train.passes = 500, 200, 2
    return c


# The time-travel ladder (SPEC section 2): each rung is the one before plus one change.
def rung1() -> Config:
    c = lecun1989()
    c.name = "rung1"
    return c


def rung1b() -> Config:
    """rung 1 with the paper's own optimizer (diagonal Levenberg-Marquardt) and 1.7159 tanh(2x/3)."""
    c = rung1()
    c.name = "rung1b"
    c.model.act = c.model.out_act = "scaled_tanh"
    # lr / (mu + h): about 0.025 where h is small. Checked against 0.00025, 0.001, 0.002, 0.004
    # (4 seeds, 23 passes, trained on 6,291 training digits, judged on the other 1,000): 0.0005
    # has the lowest held-out loss; 0.001 reaches a lower training loss but a higher held-out one.
    c.optim.name, c.optim.lr = "sdlm", 0.0005
    return c


def rung2() -> Config:
    """no tanh on the output; softmax cross-entropy; SGD lr 0.01 (the reference's choice)."""
    c = rung1()
    c.name = "rung2"
    c.model.out_act, c.train.loss, c.optim.lr = "none", "ce", 0.01
    return c


def rung3() -> Config:
    """AdamW (torch defaults: betas 0.9/0.999, weight decay 0.01), lr 3e-4 -> 1e-4 linearly, 46 passes."""
    c = rung2()
    c.name = "rung3"
    c.optim.name, c.optim.lr, c.optim.lr_end, c.optim.weight_decay = "adamw", 3e-4, 1e-4, 0.01
    c.train.passes = 46
    return c


def rung4() -> Config:
    """shifts of up to 1 pixel in x and y (translation with -1 fill, not a cyclic roll), 60 passes."""
    c = rung3()
    c.name = "rung4"
    c.train.shift, c.train.passes = 1, 60
    return c


def rung5() -> Config:
    """dropout 0.25 before H3 and ReLU everywhere, 80 passes."""
    c = rung4()
    c.name = "rung5"
    c.model.dropout, c.model.act, c.train.passes = 0.25, "relu", 80
    return c


def rung6() -> Config:
    """the rung-5 recipe on a micro-ViT matched to Net1989 (9,766 vs 9,760 parameters, 62,748 vs 63,660
    MACs); attention layers train in minibatches of 32 (AdamW 2e-3 -> 1e-4: per-example Adam at
    3e-4 is far from the best a ViT of this size can do). The peak rate was checked on
    data.val=1000 (4 seeds a candidate, `python scripts/tune_preset.py rung6`): 1e-3 / 2e-3 / 4e-3
    gave 4.45 / 3.70 / 3.90% validation error -> 2e-3 stays."""
    c = rung5()
    c.name = "rung6"
    c.model.name, c.model.out_act = "vit", "none"
    c.train.engine, c.train.batch = "population", 32
    c.optim.lr, c.optim.lr_end = 2e-3, 1e-4
    return c


def modern() -> Config:
    """the rung-5 recipe in minibatches on the population engine (the base methods are added to):
    net1989, ReLU, dropout 0.25, shifts 1, AdamW (weight decay 0.01), cross-entropy; batch 32,
    lr 6e-3 -> 1e-4 linearly per step, 80 passes. The peak rate was chosen on data.val=1000
    (4 seeds a candidate, `python scripts/tune_preset.py modern`, never on the test set):
    1.5e-3 / 3e-3 / 6e-3 / 1.2e-2 / 2.4e-2 gave 2.83 / 2.62 / 2.15 / 2.52 / 4.25% validation
    error -> 6e-3."""
    c = rung5()
    c.name = "modern"
    c.train.engine, c.train.batch = "population", 32
    c.optim.lr, c.optim.lr_end = 6e-3, 1e-4
    return c


def modern_smoke() -> Config:
    """modern at test size: 500 training and 200 test digits, 2 passes."""
    c = modern()
    c.name = "modern_smoke"
    c.data.n_train, c.data.n_test, c.train.passes = 500, 200, 2
    return c


def speedrun() -> Config:
    """the 1989 net (rung 5's ReLU version, its 1989 init) to rung 5's error in seconds, as a preset of
    registered methods on the population engine: minibatches of 128, Adam (AdamW without decay,
    beta2 0.99), a linear warm-up over 10% of the steps times a linear decay to 0, label smoothing
    0.1, one-pixel shifts, no dropout, and the softmax averaged over the 9 one-pixel shifts at test
    time (tta). lr, passes, batch, smoothing and warm-up were chosen on data.val=1000 (trained on
    the other 6,291 digits, 4 seeds a candidate) by `python scripts/tune_preset.py speedrun`, never on the
    test set: lr 0.01/0.02/0.04 -> 0.04, passes 20/30/40 -> 40, batch 64/128/256 -> 128, smoothing
    0/0.1/0.2 -> 0.1, warm-up 0.05/0.1/0.2 -> 0.2 of the steps."""
    c = modern()
    c.name = "speedrun"
    c.train.batch, c.train.passes, c.model.dropout = 128, 40, 0.0
    c.train.eval_every = 40  # evaluation (9 shifted copies of every digit) only at the end
    c.optim.name, c.optim.lr, c.optim.lr_end, c.optim.beta2, c.optim.weight_decay = "adamw", 0.04, 0.0, 0.99, 0.0
    c.methods = [MethodSpec("warmup", {"frac": 0.2}), MethodSpec("label_smoothing", {"eps": 0.1}),
                 MethodSpec("tta", {"n": 9})]
    return c


def rung7() -> Config:
    """rung 7, "2026": rung 5's recipe in minibatches (the modern preset, its rate 6e-3 chosen on
    validation) plus the best of the 2023-2026 optimizers and any registered method, chosen on
    data.val=1000 by `python scripts/tune_preset.py rung7` (4 seeds a candidate; never the test set;
    benchmarks/results/tune_rung7.json). Optimizer: AdamW 6e-3 2.15% validation error, Lion 6e-4 /
    1.5e-3 2.43 / 3.98%, Muon 0.01 / 0.02 2.33 / 2.35%, Schedule-Free AdamW 3e-3 / 6e-3 2.58 / 2.65%:
    none of the three beat AdamW here, so AdamW stays. Then tta (the softmax averaged over the 9
    one-pixel shifts) 2.03%, ema (decay 0.999) on top 1.88%, label smoothing 0.1 on top 2.28% (left out)."""
    c = modern()
    c.name = "rung7"
    c.methods = [MethodSpec("tta", {}), MethodSpec("ema", {})]
    return c


def ssm() -> Config:
    """a diagonal state-space model (models/ssm.py: dim 32, 18 states, depth 2, S4D-Lin eigenvalues, 9,610
    parameters) reading each digit as 256 pixels in row order, on the modern recipe without shifts
    (AdamW, cross-entropy, batch 32) for 10 passes, lr 2e-2 -> 1e-4, no dropout. Chosen on data.val=1000
    (2,000 training digits, 3 passes, 2 seeds; `python scripts/ssm_variants.py`, never the test set):
    the earlier preset (LRU ring 0.9-0.999, phases up to pi/8, dim 24, 28 states, lr 3e-3, dropout 0.1)
    53.9% validation error; lr 1e-2 30.0%, 2e-2 24.8%; with S4D-Lin 17.0%; no dropout 16.3%; dim 32 with
    18 states 12.5% (docs/cheaper-nets.md has the whole table)."""
    c = modern()
    c.name = "ssm"
    c.model.name, c.model.dim, c.model.depth, c.model.dropout = "ssm", 32, 2, 0.0
    c.train.shift, c.train.passes = 0, 10
    c.optim.lr = 2e-2
    return c


PRESETS = {"lecun1989": lecun1989, "smoke": smoke, "rung1": rung1, "rung1b": rung1b, "rung2": rung2,
           "rung3": rung3, "rung4": rung4, "rung5": rung5, "rung6": rung6, "modern": modern,
           "modern_smoke": modern_smoke, "speedrun": speedrun, "rung7": rung7, "ssm": ssm}


def list_presets():
    return sorted(PRESETS)


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    return PRESETS[name]()


def smoke_preset(name: str) -> Config:
    """A preset at test size: its own smoke preset where there is one (`NAME_smoke`; lecun1989's
    is `smoke`), else the preset with 500 training and 200 test digits and 2 passes (named
    NAME_smoke)."""
    own = "smoke" if name == "lecun1989" else f"{name}_smoke"
    if own in PRESETS:
        return preset(own)
    c = preset(name)
    c.name += "_smoke"
    c.data.n_train, c.data.n_test, c.train.passes = 500, 200, 2
    return c


def _base_type(tp):
    """int | None -> (int, True); float -> (float, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse(key: str, text: str, tp):
    base, optional = _base_type(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if base is int:
            return int(text)
        if base is float:
            v = float(text)
        else:
            return str(text)
    except ValueError:
        raise UserError(f"{key}={text!r}: expected {base.__name__}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise UserError(f"{key}={text!r}: must be a finite number")
    return v


def set_value(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise UserError(f"unknown config key {key!r} (keys look like 'optim.lr'; sections: "
                        f"{', '.join(f.name for f in dataclasses.fields(cfg) if f.name != 'name')})")
    section, name = parts
    sec = getattr(cfg, section, None)
    if not dataclasses.is_dataclass(sec):
        raise UserError(f"unknown config section {section!r} in {key!r}")
    fields = {f.name: f for f in dataclasses.fields(sec)}
    if name not in fields:
        raise UserError(f"unknown config key {key!r}; {section} has: {', '.join(fields)}")
    tp = fields[name].type
    if isinstance(value, str):
        value = _parse(key, value, tp)
    setattr(sec, name, value)


def apply_overrides(cfg: Config, overrides) -> Config:
    """-> a new Config: cfg with the overrides applied and validated. cfg itself is left as it was,
    also when an override is refused (a caller that reuses a preset object gets no methods it did
    not ask for)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or ():
        if item.startswith("+method="):  # +method=NAME[:key=value,...]; replaces a NAME the preset has
            from .methods.registry import parse_method
            spec = parse_method(item[len("+method="):])
            cfg.methods = [m for m in cfg.methods if (m.name if isinstance(m, MethodSpec) else m["name"]) != spec.name]
            cfg.methods.append(spec)
            continue
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        set_value(cfg, key.strip(), text.strip())
    validate(cfg)
    return cfg


def validate(cfg: Config) -> Config:
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for f in dataclasses.fields(obj):
            key, v = f"{sec.name}.{f.name}", getattr(obj, f.name)
            base, optional = _base_type(f.type)
            if v is None:
                if not optional:
                    raise UserError(f"{key} must not be empty")
                continue
            ok = isinstance(v, base) and not (base is int and isinstance(v, bool))
            if base is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
                setattr(obj, f.name, v)
                ok = True
            if not ok:
                raise UserError(f"{key}={v!r}: expected {base.__name__}")
            if key in CHOICES and v not in CHOICES[key]:
                raise UserError(f"{key}={v!r}: choose one of {', '.join(CHOICES[key])}")
            if key in RANGES:
                lo, hi, incl = RANGES[key]
                if not ((v >= lo if incl else v > lo) and v <= hi):
                    raise UserError(f"{key}={v}: must be {'>=' if incl else '>'} {lo} and <= {hi}")
    r = cfg.data.resolution
    if r not in RESOLUTIONS:
        raise UserError(f"data.resolution={r}: choose one of {', '.join(map(str, RESOLUTIONS))} (pixels a side)")
    if r != 16 and cfg.model.name != "convnet":  # Net1989 (and its kernels), the ViT and the SSM read 16x16
        raise UserError(f"model.name={cfg.model.name} takes 16x16 inputs only, not data.resolution={r} "
                        f"(model.name=convnet takes {', '.join(map(str, RESOLUTIONS))})")
    if cfg.model.dropout >= 1.0:  # the kept units would be scaled by 1/(1-p) = inf
        raise UserError(f"model.dropout={cfg.model.dropout}: must be < 1 (1 drops every unit)")
    if not cfg.train.eval_test and not (cfg.train.eval_train or cfg.data.val):
        raise UserError("train.eval_test=false needs a split to watch during training: data.val=N or "
                        "train.eval_train=true")
    if cfg.train.engine in ("minibatch", "hooked"):  # the two minibatch engines became one
        cfg.train.engine = "population"
    per_example = cfg.train.engine in ("fast", "eager")
    if per_example and cfg.train.batch > 1:
        raise UserError(f"train.batch={cfg.train.batch} needs train.engine=population (fast and eager are per example)")
    if per_example and cfg.model.name != "net1989":
        raise UserError(f"model.name={cfg.model.name} needs train.engine=population")
    if cfg.model.name == "convnet" and (cfg.model.act != "relu" or cfg.model.out_act != "none"):
        raise UserError("model.name=convnet needs model.act=relu and model.out_act=none (ReLU convs, logits out)")
    if (cfg.model.block != "plain" or cfg.model.width) and cfg.model.name != "convnet" and not (
            cfg.model.name == "deep" and cfg.model.block == "plain"):
        raise UserError(f"model.block and model.width are the convnet's (model.width also deep's); "
                        f"model.name={cfg.model.name}")
    if (cfg.model.stack != "mlp" or cfg.model.norm != "rezero") and cfg.model.name != "deep":
        raise UserError(f"model.stack and model.norm are deep's; model.name={cfg.model.name}")
    if cfg.model.name == "deep" and (cfg.model.act != "relu" or cfg.model.out_act != "none"):
        raise UserError("model.name=deep needs model.act=relu and model.out_act=none (ReLU blocks, logits out)")
    if cfg.model.seq != "inorder" and cfg.model.name != "ssm":
        raise UserError(f"model.seq={cfg.model.seq} is the ssm's; model.name={cfg.model.name}")
    if cfg.model.name == "ssm" and cfg.model.out_act != "none":
        raise UserError("model.name=ssm needs model.out_act=none (logits out)")
    if cfg.train.loss == "ce" and cfg.model.out_act != "none":
        raise UserError("train.loss=ce needs model.out_act=none (cross-entropy takes logits)")
    if cfg.methods or cfg.train.engine == "population":
        from .methods.registry import check_config
        check_config(cfg)
    return cfg


def from_dict(d: dict) -> Config:
    cfg = Config()
    cfg.name = d.get("name", cfg.name)
    for sec, vals in d.items():
        if sec == "name":
            continue
        if sec == "methods":
            if not isinstance(vals, list) or not all(isinstance(v, dict) and "name" in v for v in vals):
                raise UserError("config 'methods' is not a list of {name, options}")
            cfg.methods = [MethodSpec(v["name"], dict(v.get("options") or {})) for v in vals]
            continue
        if not isinstance(vals, dict):
            raise UserError(f"config section {sec!r} is not a mapping")
        for k, v in vals.items():
            if not dataclasses.is_dataclass(getattr(cfg, sec, None)):
                raise UserError(f"unknown config section {sec!r}")
            set_value(cfg, f"{sec}.{k}", v)
    return validate(cfg)
