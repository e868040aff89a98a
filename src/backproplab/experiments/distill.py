"""Does a distilled Net1989 beat the same net trained alone? (Hinton et al. 2015 at this size.)

  teacher     an ensemble of `teacher_seeds` Net1989s (modern recipe, teacher_passes passes; seeds
              from 100 on, none of them a student's), one finished run folder: the soft targets are
              the mean of the seeds' tempered softmaxes, its test error the ensemble's
  alone       the students' net and recipe (modern, `passes` passes, seeds 0..n-1) without a teacher
  T sweep     distill from the ensemble at each temperature (alpha fixed), `sweep_seeds` seeds; the
              temperature is chosen on the validation split (data.val digits held out), never on test
  distilled   the chosen T, all seeds
  born-again  the teacher is the same net trained alone once (seed 200, the students' passes)

The gap closed is (alone - distilled) / (alone - teacher) in test error, with the difference's 95%
CI (Welch) over the seeds.
"""
import time
from pathlib import Path

import numpy as np

from ..config import apply_overrides, preset
from ..engine.train import train
from ..report.progress import ProgressBar
from ..store import add_run
from .effects import welch

TEACHER_SEED, SELF_SEED = 100, 200


def _cfg(passes, seeds, seed, val, smoke, methods=()):
    items = [f"train.passes={passes}", f"train.seeds={seeds}", f"train.seed={seed}", f"data.val={val}",
             "train.eval_train=false"] + [f"+method={m}" for m in methods]
    return apply_overrides(preset("modern_smoke" if smoke else "modern"), items)


def _run(cfg, folder: Path, log, label):
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = train(cfg, out=folder, resume=True, progress=ProgressBar(cfg.train.passes, label=f"{label}: pass"))
    add_run(folder, "train", cfg.name, r.status, r.config, r.summary(), r.history, {})
    val, test = [f["val_error"] for f in r.final], [f["test_error"] for f in r.final]
    row = {"label": label, "seeds": len(test), "passes": cfg.train.passes, "seconds": round(time.perf_counter() - t0, 1),
           "val_error": float(np.mean(val)), "test_error": float(np.mean(test)),
           "test_error_std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0, "test_per_seed": test,
           "val_per_seed": val, "path": r.path, "methods": [m["name"] for m in r.config.get("methods", [])]}
    log(f"  {label:28s} val {row['val_error']:.2f}%  test {row['test_error']:.2f} +- {row['test_error_std']:.2f}%"
        f"  ({row['seeds']} seeds, {row['passes']} passes, {row['seconds']:.0f} s, {r.path})")
    return row


def ensemble_error(folder, data) -> float:
    """Test error of the teacher run's mean softmax (what the students are taught)."""
    from ..methods.distill import Teacher
    import torch
    p = Teacher(str(folder)).probs(torch.as_tensor(np.asarray(data.test_x)).reshape(-1, 1, 16, 16), 1.0)
    return float(100.0 * (p.argmax(1) != data.test_labels).float().mean())


def run(out, seeds=8, passes=10, teacher_passes=20, teacher_seeds=8, temps=(2.5, 4.0, 20.0), alpha=0.5,
        sweep_seeds=4, val=1000, smoke=False, log=print) -> dict:
    from ..data import load_dataset
    out = Path(out)
    t0 = time.perf_counter()
    tcfg = _cfg(teacher_passes, teacher_seeds, TEACHER_SEED, val, smoke)
    teacher = _run(tcfg, out / "teacher", log, f"teacher ({teacher_seeds} seeds, each)")
    data = load_dataset(tcfg.data.source, tcfg.data.n_train, tcfg.data.n_test).with_validation(val)
    teacher["ensemble_test_error"] = ensemble_error(out / "teacher", data)
    log(f"  teacher ensemble (mean softmax of {teacher_seeds}): test {teacher['ensemble_test_error']:.2f}%")
    self_t = _run(_cfg(passes, 1, SELF_SEED, val, smoke), out / "teacher-self", log, "born-again teacher (1 seed)")
    alone = _run(_cfg(passes, seeds, 0, val, smoke), out / "alone", log, "student alone")
    sweep = []
    for T in temps:
        spec = f"distill:teacher={out / 'teacher'},T={T},alpha={alpha}"
        row = _run(_cfg(passes, sweep_seeds, 0, val, smoke, [spec]), out / f"sweep-T{T:g}", log,
                   f"distilled T={T:g} (sweep)")
        row["T"] = T
        sweep.append(row)
    best = min(sweep, key=lambda r: r["val_error"])["T"]
    log(f"  T chosen on validation: {best:g}")
    final = _run(_cfg(passes, seeds, 0, val, smoke, [f"distill:teacher={out / 'teacher'},T={best},alpha={alpha}"]),
                 out / "distilled", log, f"distilled T={best:g}")
    born = _run(_cfg(passes, seeds, 0, val, smoke, [f"distill:teacher={out / 'teacher-self'},T={best},"
                                                    f"alpha={alpha}"]), out / "born-again", log,
                f"born-again T={best:g}")
    t_err = teacher["ensemble_test_error"]
    for r in (final, born):
        d, lo, hi, p = welch(r["test_per_seed"], alone["test_per_seed"])
        r["vs_alone"] = {"diff": d, "ci": [lo, hi], "p": p}
    gap = alone["test_error"] - t_err
    closed = (alone["test_error"] - final["test_error"]) / gap if gap > 0 else float("nan")
    return {"seeds": seeds, "passes": passes, "teacher_passes": teacher_passes, "teacher_seeds": teacher_seeds,
            "alpha": alpha, "temps": list(temps), "sweep_seeds": sweep_seeds, "val": val, "T": best,
            "teacher": teacher, "teacher_self": self_t, "alone": alone, "sweep": sweep, "distilled": final,
            "born_again": born, "gap_closed": closed, "target_gap_closed": 0.5,
            "seconds": round(time.perf_counter() - t0, 1)}
