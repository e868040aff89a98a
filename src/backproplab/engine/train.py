"""train(cfg) -> Result: the one training loop for per-example engines.

Per pass: build the pass's random streams (shared by all engines), train in chunks
(so a progress bar can move), evaluate every replica, log one line, checkpoint
atomically. A resumed run restarts at the pass after the last checkpoint; since the
random streams are keyed by (seed, pass) and the engines' state is exact, it ends
bit-identical to an uninterrupted run.
"""
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import Config, validate
from ..data import load_dataset, pass_randomness
from ..errors import UserError
from ..models.net1989 import init_params, weights_sha256
from .checkpoint import check_config, has_checkpoint, load_checkpoint, save_checkpoint, to_numpy_state
from .evaluate import evaluate

CHUNKS_PER_PASS = 8
SPLITS = ("train", "test")


@dataclass
class Result:
    config: dict
    seeds: list
    history: list                    # per evaluated pass: {"pass", "seconds" (that pass's), "seconds_total",
                                     #   "train": [per replica], "test": [...]}
    final: list                      # per replica: {"seed", "train_loss", ..., "weights_sha256"}
    seconds: float                   # training time (engine only), all passes including resumed ones
    eval_seconds: float
    n_train: int = 0
    status: str = "finished"         # finished | diverged
    message: str = ""
    params: list = field(default_factory=list, repr=False)
    path: str = ""                   # how gradients were computed: per-example, fused or autograd

    def summary(self) -> dict:
        s = {"passes": self.history[-1]["pass"] if self.history else 0,  # passes trained (eval_every may skip some)
             "seeds": len(self.seeds), "engine": self.config["train"]["engine"],
             "seconds": round(self.seconds, 3), "eval_seconds": round(self.eval_seconds, 3),
             "status": self.status, "error_unit": "percent", "path": self.path,
             "config_digest": _digest(self.config)}
        keys = [f"{sp}_{k}" for sp in ("train", "val", "test") for k in ("loss", "error", "misses")]
        for key in (k for k in keys if k in self.final[0]):
            vals = np.array([f[key] for f in self.final], dtype=np.float64)
            s[key] = float(vals.mean()) if len(vals) > 1 else self.final[0][key]
            if len(vals) > 1:
                s[key + "_std"] = float(vals.std(ddof=1))
        if len(self.final) == 1:
            s["weights_sha256"] = self.final[0]["weights_sha256"]
        else:
            s["weights_sha256"] = [f["weights_sha256"] for f in self.final]
            s["per_seed"] = self.final
        if self.message:
            s["message"] = self.message
        return s


def _digest(cfg_dict) -> str:
    from ..config import from_dict
    return from_dict(cfg_dict).digest()


def environment() -> dict:
    env = {"backproplab": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        import numba
        env["numba"] = numba.__version__
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode == 0:
            env["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def make_engine(cfg: Config, seeds: list, dctx=None):
    """An engine: train_pass(x, labels, lr, shifts, keep), params(), state(), load_state(state);
    optionally evaluate(x, labels, loss) -> per-replica metrics and dropout_units (keep-mask width).
    dctx: the torchrun setting (engine/ddp.py): the population engine with DDP.
    """
    m, o, t = cfg.model, cfg.optim, cfg.train
    if dctx is not None:
        from .ddp import DDPPopulation
        return DDPPopulation(cfg, seeds, dctx)
    if t.engine == "population":  # every minibatch run: the one population engine
        from .population import Population
        return Population(cfg, seeds)
    params = [{n: v.numpy() for n, v in init_params(s).items()} for s in seeds]
    kw = dict(act=m.act, out_act=m.out_act, loss=t.loss, optim=o.name, weight_decay=o.weight_decay,
              betas=(o.beta1, o.beta2), eps=o.eps, dropout=m.dropout)
    if o.name == "sdlm":
        kw.update(mu=o.mu, gamma=o.gamma)
    if t.engine == "eager":
        if t.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available on this machine")
        from .eager import EagerPopulation
        return EagerPopulation(params, device=t.device, **kw)
    if t.device != "cpu":
        raise UserError("the fast engine runs on the CPU; use --engine eager for train.device=cuda")
    from .fast import FastPopulation
    return FastPopulation(params, **kw)


def step_lrs(cfg: Config, pass_idx: int, n: int) -> np.ndarray:
    """Learning rate of each step of one pass; linear lr -> lr_end over the whole run when set."""
    o = cfg.optim
    if o.lr_end is None:
        return np.full(n, o.lr, dtype=np.float32)
    total = cfg.train.passes * n
    t = np.arange(pass_idx * n, (pass_idx + 1) * n, dtype=np.float64)
    frac = t / max(total - 1, 1)
    return (o.lr + (o.lr_end - o.lr) * frac).astype(np.float32)


def checkpoint_path(cfg: Config, out: Path) -> Path:
    return out / "checkpoints" / f"{cfg.name}-{cfg.digest()}.pt"


def prepare_out(out) -> Path | None:
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    try:  # a real write: permission bits do not bind root, and a read-only mount only shows on writing
        fd, probe = tempfile.mkstemp(dir=out / "checkpoints", prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output folder {out} is not writable: {e.strerror or e}") from None
    return out


def _final(seeds, params, hist_last, splits=SPLITS):
    return [{"seed": s, **{f"{sp}_{k}": hist_last[sp][r][k] for sp in splits for k in ("loss", "error", "misses")},
             "weights_sha256": weights_sha256(params[r])} for r, s in enumerate(seeds)]


def distributed(cfg: Config):
    """The torchrun setting of this process (engine/ddp.py), or None when not under torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    from .ddp import from_env
    return from_env(cfg)


def train(cfg: Config, out=None, resume: bool = False, log=None, progress=None, data=None,
          on_pass=None) -> Result:
    """log(str) gets one line per pass; progress(pass_idx, done, total) as the pass advances.
    Under torchrun: data-parallel (engine/ddp.py); rank 0 logs and writes checkpoints."""
    validate(cfg)
    dctx = distributed(cfg)
    if dctx is not None and not dctx.writer:
        log = progress = None
    torch.set_num_threads(cfg.train.threads)
    out = prepare_out(out)
    data = data or load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test, cfg.data.resolution)
    side = cfg.data.resolution
    if tuple(data.train_x.shape[-2:]) != (side, side):
        raise UserError(f"the data's images are {data.train_x.shape[-2]}x{data.train_x.shape[-1]} pixels; "
                        f"data.resolution={side}")
    if cfg.data.val and data.val_x is None:
        data = data.with_validation(cfg.data.val)
    seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]
    try:
        engine = make_engine(cfg, seeds, dctx)
    except (ValueError, RuntimeError) as e:  # an engine refusing a setting or this machine
        raise UserError(f"cannot build the {cfg.train.engine} engine: {e}") from None
    if cfg.train.engine == "fast" or getattr(engine, "path", None) == "kernel":
        from ..report.progress import note
        from .warmup import prepare_kernels
        prepare_kernels(note)  # a cold numba cache is compiled here, announced, and not timed as training
    units = getattr(engine, "dropout_units", 192)
    history, start, seconds, eval_seconds = [], 0, 0.0, 0.0
    ckpt = checkpoint_path(cfg, out) if out is not None else None
    status, message = "finished", ""
    if resume and ckpt is not None and has_checkpoint(ckpt):
        state = load_checkpoint(ckpt)
        check_config(ckpt, state.get("config"), cfg.to_json())
        try:
            engine.load_state(to_numpy_state(state["engine"]))
            history, start = list(state["history"]), int(state["passes_done"])
            seconds, eval_seconds = float(state["seconds"]), float(state["eval_seconds"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UserError(f"checkpoint {ckpt} does not fit this model: {type(e).__name__} {e}") from None
        # a diverged run is final: resuming reports it again instead of re-running the bad pass
        status, message = str(state.get("status", "finished")), str(state.get("message", ""))
        if log:
            log(f"resumed from {ckpt} after pass {start}")
        if status != "finished":
            start = cfg.train.passes
            if history and not all(sp in history[-1] for sp in data.splits()):  # a checkpoint from before the
                # last record of a diverged run held every split: evaluate the stored weights for it
                history[-1].update({sp: v for sp, v in _evaluate_pass(engine, data, cfg, len(history) - 1, 0.0,
                                                                       last=True).items() if sp not in history[-1]})
    elif resume and out is not None:
        from ..report.progress import note
        note(f"no checkpoint in {out}: starting fresh")
    x = data.train_x.reshape(-1, side, side).numpy()
    labels = data.train_labels.numpy()
    n, m, t = len(x), cfg.model, cfg.train
    for p in range(start, t.passes):
        lrs = step_lrs(cfg, p, n)
        rand = [pass_randomness(s, p, n, t.shift, m.dropout, units) for s in seeds]
        shifts = np.stack([r[0] for r in rand]) if t.shift > 0 else None
        keep = np.stack([r[1] for r in rand]) if m.dropout > 0 else None
        t0 = time.perf_counter()
        bounds = np.linspace(0, n, CHUNKS_PER_PASS + 1).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            engine.train_pass(x[a:b], labels[a:b], lrs[a:b],
                              None if shifts is None else shifts[:, a:b], None if keep is None else keep[:, a:b])
            if progress:
                progress(p, int(b), n)
        if hasattr(engine, "end_pass"):  # minibatches stay aligned to passes: the last one may be smaller
            engine.end_pass()
        dt = time.perf_counter() - t0
        seconds += dt
        bad_w = [seeds[r] for r, prm in enumerate(engine.params()) if not _finite(prm)]
        if bad_w or (p + 1) % t.eval_every == 0 or p + 1 == t.passes:  # a diverged pass is always evaluated
            t0 = time.perf_counter()
            rec = _evaluate_pass(engine, data, cfg, p, dt, last=bool(bad_w) or p + 1 == t.passes)
            rec["seconds_total"] = seconds  # training seconds up to here (eval_every may skip passes)
            eval_seconds += time.perf_counter() - t0
            history.append(rec)
            if log:
                log(format_pass(rec, t.passes))
            if on_pass:  # e.g. a search trial reporting to its pruner; raising stops the run here
                on_pass(rec)
            watched = rec[next(sp for sp in ("train", "val", "test") if sp in rec)]  # train.eval_train=false
            bad_l = [seeds[r] for r, v in enumerate(watched) if not math.isfinite(v["loss"])]
            if (bad_w or bad_l) and not all(sp in rec for sp in data.splits()):
                # the run ends here: its last record holds every split (eval_train/eval_test=false skipped some)
                rec.update({sp: v for sp, v in _evaluate_pass(engine, data, cfg, p, dt, last=True).items()
                            if sp not in rec})
            if bad_w or bad_l:
                what = ([f"NaN/Inf weights (seeds {bad_w})"] if bad_w else []) + \
                       ([f"NaN/Inf loss (seeds {bad_l})"] if bad_l else [])
                status, message = "diverged", f"diverged in pass {p + 1}: " + "; ".join(what)
        if ckpt is not None and (dctx is None or dctx.writer):
            save_checkpoint(ckpt, {"config": cfg.to_json(), "passes_done": p + 1, "history": history,
                                   "seconds": seconds, "eval_seconds": eval_seconds, "engine": engine.state(),
                                   "status": status, "message": message})
        if status != "finished":
            break
    if dctx is not None:
        dctx.finish()
    params = engine.params()
    return Result(cfg.to_dict(), seeds, history, _final(seeds, params, history[-1], data.splits()), seconds,
                  eval_seconds, n, status, message, params, getattr(engine, "path", "per-example"))


def _finite(params: dict) -> bool:
    return all(bool(np.isfinite(np.asarray(v)).all()) for v in params.values())


def _evaluate_pass(engine, data, cfg, p, dt, last=True) -> dict:
    """Every split; with train.eval_train=false the training split only after the last pass, with
    train.eval_test=false the test split likewise."""
    m, t = cfg.model, cfg.train
    cur = None if hasattr(engine, "evaluate") else engine.params()
    rec = {"pass": p + 1, "seconds": dt}
    for sp in data.splits():
        if (sp == "train" and not (t.eval_train or last)) or (sp == "test" and not (t.eval_test or last)):
            continue
        xs, ls = getattr(data, f"{sp}_x"), getattr(data, f"{sp}_labels")
        rec[sp] = engine.evaluate(xs, ls, t.loss) if cur is None else evaluate(cur, xs, ls, m.act, m.out_act, t.loss)
    return rec


def format_pass(rec: dict, passes: int) -> str:
    def part(sp):
        v = rec[sp]
        loss = np.mean([r["loss"] for r in v])
        err = np.mean([r["error"] for r in v])
        miss = np.mean([r["misses"] for r in v])
        miss_s = f"{int(miss)}" if len(v) == 1 else f"{miss:.1f}"
        return f"{sp} loss {loss:.6f} error {err:5.2f}% misses {miss_s:>5}"
    parts = [part(sp) for sp in ("train", "val", "test") if sp in rec]
    return f"pass {rec['pass']:3d}/{passes}  {'  |  '.join(parts)}  ({rec['seconds']:.2f} s)"
