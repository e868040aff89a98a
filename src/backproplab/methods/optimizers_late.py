"""Optimizers registered after every other family, so that no earlier method's rank (which keys
its random streams) moves: ADOPT (2024). The update maths is in methods/optimizers.py."""
from .optimizers import ADOPT  # noqa: F401  (the switch, found by impl="optimizers_late:ADOPT")
from .registry import Method, Option, register


def _names(cfg):
    return [s["name"] if isinstance(s, dict) else s.name for s in cfg.methods]


def _adopt_check(cfg, opts):
    if opts.get("weight_decay") and "wd" in _names(cfg):
        return (f"weight_decay={opts['weight_decay']} and the wd method both decay the weights (decoupled); "
                f"keep one")
    return None


register(Method(
    "adopt", summary="ADOPT: m <- b1 m + (1-b1) clip(g / max(sqrt(v_prev), eps)); w <- w - lr m; then v",
    impl="optimizers_late:ADOPT", kind="optimizer", touches=("optimizer",), hooks=("step",), slot="optimizer",
    options={"beta1": Option(0.9, "", "momentum of the normalized gradient", 0.0, 0.9999),
             "beta2": Option(0.9999, "", "second-moment decay", 0.0, 0.999999),
             "eps": Option(1e-6, "", "floor of sqrt(v): g / max(sqrt(v), eps)", 0.0, 1.0),
             "clip": Option(True, "", "clip the normalized gradient to +-t^(1/4) (the published variant)"),
             "weight_decay": Option(0.0, "per unit lr", "decoupled decay w <- w (1 - lr wd)", 0.0, 10.0)},
    check=_adopt_check,
    what="Adam with two changes that make it converge for any beta2 at the optimal rate: the gradient "
         "g_t is divided by the root of the second moment v_{t-1} of the steps before it (not including "
         "g_t), clipped elementwise to +-t^(1/4) (t = 1 on the first update), averaged into the momentum "
         "m_t = b1 m + (1-b1) clip(g_t / max(sqrt(v_{t-1}), eps)), and w <- w - lr m_t; only then "
         "v_t = b2 v_{t-1} + (1-b2) g_t^2. The first step only sets v_0 = g_0^2 and leaves the weights "
         "as they are (m_0 = 0); no bias correction. clip=false is the unclipped update of the paper's first version. "
         "Applied to every parameter; lr (after the schedule) is per replica. Rates as Adam's: the "
         "paper runs it at the rate it gives Adam.",
    interactions="refuses weight_decay > 0 together with the wd method (both are decoupled decay).",
    paper="Taniguchi et al. 2024, 'ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate' "
          "(NeurIPS 2024; the clipped update of the revised arXiv version and the authors' code)",
    oracle="the update written out in plain torch from the paper, two replicas at different rates: same "
           "weights after 6 steps (tests/test_adopt.py)"))
