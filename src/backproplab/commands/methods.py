"""`backproplab methods [NAME]` (the registry, or one card) and `backproplab train PRESET +method=... key=value`."""
from ..jsonout import emit_json as _emit_json


def register(sub, add_common):
    m = sub.add_parser("methods", help="the training-methods registry: name, kind, what it touches, summary")
    add_common(m)
    m.add_argument("name", nargs="?", help="print this method's card")
    t = sub.add_parser("train", help="train a preset with methods: train modern +method=sam +method=swa:start=0.5")
    add_common(t)
    t.add_argument("preset", help="config preset (modern, modern_smoke, rung5, lecun1989, ...)")
    t.add_argument("items", nargs="*", metavar="+method=NAME[:k=v,...] | key=value",
                   help="methods and config overrides, e.g. +method=cosine optim.lr_end=none")
    t.add_argument("--seeds", type=int, help="replicas trained at once (train.seeds)")
    t.add_argument("--resume", action="store_true", help="continue the stopped run with this config in --out")
    t.add_argument("--quiet", action="store_true", help="no per-pass lines")
    t.add_argument("--smoke", action="store_true",
                   help="test size: the preset's own NAME_smoke preset, else 500/200 digits and 2 passes")




def cmd_methods(args):
    from ..methods.registry import get_method, list_methods
    if args.name:
        m = get_method(args.name)
        print(m.card())
        if args.json:
            _emit_json(_record(m))
        return 0
    from ..report.console import render, table
    ms = list_methods()
    print(render(table(["name", "kind", "touches", "summary"],
                       [(m.name, m.kind, ",".join(m.touches), m.summary) for m in ms])))
    print(f"{len(ms)} methods; `backproplab methods NAME` prints a card; "
          f"`backproplab train PRESET +method=NAME[:k=v,...]` uses them")
    if args.json:
        _emit_json({"methods": [_record(m) for m in ms]})
    return 0


def _record(m) -> dict:
    return {"name": m.name, "kind": m.kind, "touches": list(m.touches), "hooks": list(m.hooks), "slot": m.slot,
            "summary": m.summary, "options": {k: {"default": o.default, "unit": o.unit} for k, o in m.options.items()},
            "incompatible_with": sorted(m.incompatible_with), "requires": list(m.requires), "paper": m.paper}


def train_config(preset_name, items, seeds=None, smoke=False):
    """A validated config from a preset (at test size with smoke), +method=... items and key=value
    overrides; methods put the run on the population engine unless train.engine is given."""
    from ..config import apply_overrides, preset, smoke_preset
    cfg = smoke_preset(preset_name) if smoke else preset(preset_name)
    items = list(items)
    if any(i.startswith("+method=") for i in items) and cfg.train.engine != "population":
        items.insert(0, "train.engine=population")
    if seeds is not None:
        items.append(f"train.seeds={seeds}")
    return apply_overrides(cfg, items)


def cmd_train(args):
    cfg = train_config(args.preset, args.items, args.seeds, args.smoke)  # config errors before torch is busy
    from ..cli import train_and_record
    if not args.quiet:
        names = [s.name + (":" + ",".join(f"{k}={v}" for k, v in s.options.items()) if s.options else "")
                 for s in cfg.methods]
        print(f"{cfg.name} ({cfg.digest()}), engine {cfg.train.engine}, methods: {' '.join(names) or 'none'}",
              flush=True)
    return train_and_record(cfg, args, "train", published=cfg.name.startswith(("lecun1989", "rung1", "smoke")),
                            extra={"methods": [s.name for s in cfg.methods]})


COMMANDS = {"methods": cmd_methods, "train": cmd_train}
