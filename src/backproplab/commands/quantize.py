"""`backproplab quantize DIR`: int8 (PT2E post-training quantization; with --qat-passes N, after N
passes of quantization-aware fine-tuning on the engine with +method=qat) and bf16 versions of a
finished run in DIR; test error and weight bytes against fp32, per seed. A run trained with
+method=qat is quantized by PTQ (its stored float weights are those it fake-quantized).

The run is read, never written: its checkpoint and store record stay as they are. Results
go to the store of --out (default: DIR) as a run of kind `quantize`.
"""
import json
import time
from pathlib import Path

from ..errors import UserError
from ..jsonout import emit_json


def register(sub, add_common):
    q = sub.add_parser("quantize", help="int8 (PT2E, x86 inductor quantizer) and bf16 versions of a finished run: "
                                        "test error and weight bytes against fp32")
    add_common(q)
    q.add_argument("dir", help="output folder of a finished run (its runs.db and checkpoints/)")
    q.add_argument("--run", type=int, help="run id in DIR's store (default: the latest finished train/repro run)")
    q.add_argument("--qat-passes", type=int, default=0,
                   help="fine-tune the run's weights on the engine with +method=qat (its own recipe) for this "
                        "many passes before converting (default 0: PTQ)")
    q.add_argument("--qat-lr", type=float, default=3e-4,
                   help="constant rate of the QAT fine-tuning, for the run's optimizer (default 3e-4)")
    q.add_argument("--smoke", action="store_true", help="test size: the first replica, 300 test digits")
    q.set_defaults(out=None)


def _params_of(cfg, state: dict) -> list[dict]:
    """Per replica {name: array} from a checkpoint's engine state (population or per-example)."""
    import numpy as np
    from ..models.net1989 import PARAM_NAMES
    from ..models.registry import build_model
    eng = state["engine"]
    if "W" in eng:
        w = np.asarray(eng["W"])
        if cfg.model.name == "net1989":
            from ..models.net1989 import PARAM_SHAPES
            shapes = [(n, PARAM_SHAPES[n]) for n in PARAM_NAMES]
        else:
            shapes = [(n, tuple(p.shape)) for n, p in build_model(cfg.model, 0, cfg.data.resolution).named_parameters()]
        total = sum(int(np.prod(s)) for _, s in shapes)
        if w.shape[1] != total:
            raise UserError(f"the run's weights ({w.shape[1]} per replica) are not the plain {cfg.model.name}'s "
                            f"({total}): model methods change the net; quantize takes the plain nets")
        out = []
        for r in range(w.shape[0]):
            a, d = 0, {}
            for n, s in shapes:
                k = int(np.prod(s))
                d[n] = w[r, a:a + k].reshape(s)
                a += k
            out.append(d)
        return out
    reps = sorted({int(k.split(".")[0]) for k in eng if k.split(".")[0].isdigit()})
    return [{n: np.asarray(eng[f"{r}.{n}"]) for n in PARAM_NAMES} for r in reps]


def load_trained(folder, run_id=None):
    """-> (run record, Config, per-replica params) of a finished run in folder."""
    from ..config import from_dict
    from ..engine.checkpoint import has_checkpoint, load_checkpoint
    from ..engine.train import checkpoint_path
    from ..store import list_runs
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"no run folder {folder}")
    runs = [r for r in list_runs(path) if r["status"] == "finished" and r["kind"] in ("train", "repro")]
    if run_id is not None:
        runs = [r for r in runs if r["id"] == run_id]
        if not runs:
            raise UserError(f"{folder} has no finished train or repro run with id {run_id}")
    if not runs:
        raise UserError(f"{folder} has no finished train or repro run")
    rec = runs[-1]
    cfg = from_dict(rec["config"])
    ckpt = checkpoint_path(cfg, path)
    if not has_checkpoint(ckpt):
        raise UserError(f"run {rec['id']} in {folder} has no checkpoint {ckpt.name}")
    state = load_checkpoint(ckpt, fallback=False)
    if json.loads(state["config"]) != json.loads(cfg.to_json()):
        raise UserError(f"checkpoint {ckpt.name} is not run {rec['id']}'s")
    return rec, cfg, _params_of(cfg, state)


def cmd_quantize(args):
    if args.qat_passes < 0 or not args.qat_lr > 0:
        raise UserError(f"--qat-passes must be >= 0 and --qat-lr > 0, not {args.qat_passes} and {args.qat_lr}")
    rec, cfg, reps = load_trained(args.dir, args.run)
    import numpy as np
    import torch
    from ..data import load_dataset
    from ..engine.train import environment
    from ..experiments import quantize as qz
    from ..experiments.effects import welch
    from ..store import add_run, check_store
    out = args.out or args.dir
    check_store(out)
    torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test, resolution=cfg.data.resolution)
    if cfg.data.val:
        data = data.with_validation(cfg.data.val)
    if args.smoke:
        reps = reps[:1]
        data.test_x, data.test_labels = data.test_x[:300], data.test_labels[:300]
    calib = data.train_x[:qz.CAL_DIGITS]
    seeds = [cfg.train.seed + r for r in range(len(reps))]
    fp32s = [qz.deployable(cfg.model, p, cfg.data.resolution) for p in reps]  # refuses nets with no int8 path
    rows, path = [], None
    t0 = time.perf_counter()
    tuned = reps
    if args.qat_passes:
        side = cfg.data.resolution
        tuned, path = qz.qat_finetune(cfg, reps, data.train_x.reshape(-1, side, side).numpy(),
                                      data.train_labels.numpy(), args.qat_passes, args.qat_lr, seeds)
    for r, fp32 in enumerate(fp32s):
        row = {"seed": seeds[r]}
        forms = [("fp32", fp32, torch.float32)]
        if args.qat_passes:  # the fine-tuned float net: what the extra passes did before int8
            forms.append(("qat_fp32", qz.deployable(cfg.model, tuned[r], cfg.data.resolution), torch.float32))
        int8 = qz.ptq(forms[-1][1], calib)
        forms += [("int8", int8, torch.float32), ("bf16", qz.bf16(fp32), torch.bfloat16)]
        for name, m, dt in forms:
            row[f"{name}_test_error"] = qz.error(m, data.test_x, data.test_labels, dt)
            row[f"{name}_bytes"] = qz.weight_bytes(m)
        rows.append(row)
    seconds = time.perf_counter() - t0
    summary = {"source_run": rec["id"], "source_dir": str(args.dir), "method": "qat" if args.qat_passes else "ptq",
               "source_methods": [m["name"] if isinstance(m, dict) else m.name for m in cfg.methods],
               "qat_passes": args.qat_passes, "seeds": len(rows), "seconds": round(seconds, 2), "per_seed": rows}
    if args.qat_passes:
        summary.update(qat_lr=args.qat_lr, qat_path=path)
        e = [row["qat_fp32_test_error"] for row in rows]
        summary["qat_fp32_test_error"] = float(np.mean(e))
        summary["qat_fp32_test_error_std"] = float(np.std(e, ddof=1)) if len(e) > 1 else 0.0
    for name in ("fp32", "int8", "bf16"):
        e = [row[f"{name}_test_error"] for row in rows]
        summary[f"{name}_test_error"] = float(np.mean(e))
        summary[f"{name}_test_error_std"] = float(np.std(e, ddof=1)) if len(e) > 1 else 0.0
    for name in ("int8", "bf16"):
        d, lo, hi, _ = welch([row[f"{name}_test_error"] for row in rows], [row["fp32_test_error"] for row in rows])
        diffs = [row[f"{name}_test_error"] - row["fp32_test_error"] for row in rows]
        summary[f"{name}_minus_fp32"] = {"mean": float(np.mean(diffs)), "paired_ci": _paired_ci(diffs),
                                         "welch_ci": [lo, hi]}
    b32, b8 = rows[0]["fp32_bytes"], rows[0]["int8_bytes"]
    summary["weights_ratio"] = b32["weights"] / b8["weights"]
    summary["total_ratio"] = (b32["weights"] + b32["other"]) / (b8["weights"] + b8["other"])
    _print(cfg, rec, summary)
    run_id = add_run(out, "quantize", cfg.name, "finished", rec["config"], summary, [], environment())
    summary["run_id"] = run_id
    if args.json:
        emit_json(summary)
    return 0


def _paired_ci(diffs) -> list:
    import math

    import numpy as np
    from scipy import stats
    d = np.asarray(diffs, float)
    if len(d) < 2:
        return [math.nan, math.nan]
    h = float(stats.t.ppf(0.975, len(d) - 1)) * d.std(ddof=1) / math.sqrt(len(d))
    return [float(d.mean() - h), float(d.mean() + h)]


def _print(cfg, rec, s):
    b32, b8, b16 = (s["per_seed"][0][f"{k}_bytes"] for k in ("fp32", "int8", "bf16"))
    trained = f", trained with {'+'.join(s['source_methods'])}" if s["source_methods"] else ""
    print(f"run {rec['id']} ({cfg.name}, {cfg.model.name}{trained}), {s['seeds']} seeds, {s['method']}"
          + (f" ({s['qat_passes']} passes of +method=qat on the {s['qat_path']} path, rate {s['qat_lr']:g};"
             f" the fine-tuned fp32 net: {s['qat_fp32_test_error']:.2f} +- {s['qat_fp32_test_error_std']:.2f}%)"
             if s["qat_passes"] else ""))
    print(f"{'':6s} {'test error':>16s} {'- fp32 [95% CI, paired]':>28s} {'weight bytes':>13s} {'other bytes':>12s}")
    for k, b in (("fp32", b32), ("int8", b8), ("bf16", b16)):
        line = f"{k:6s} {s[f'{k}_test_error']:7.2f} +- {s[f'{k}_test_error_std']:4.2f}%"
        if k != "fp32":
            d = s[f"{k}_minus_fp32"]
            line += f" {d['mean']:+8.2f} [{d['paired_ci'][0]:+6.2f}, {d['paired_ci'][1]:+6.2f}]    "
        else:
            line += " " * 29
        print(line + f" {b['weights']:13d} {b['other']:12d}")
    print(f"weights {s['weights_ratio']:.2f}x smaller in int8 ({s['total_ratio']:.2f}x with biases and scales); "
          f"{s['seconds']:.1f} s")


COMMANDS = {"quantize": cmd_quantize}
