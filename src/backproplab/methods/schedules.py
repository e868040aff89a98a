"""Learning-rate schedules: lr at step t of T as pure functions, and their switches.

t counts optimizer steps from 0; T = passes * ceil(n_train / batch) is the run's number
of steps (batches are aligned to passes). lr0 is optim.lr. A schedule method replaces
the linear optim.lr -> optim.lr_end decay, so it needs optim.lr_end=none (the config
check says so); warm-up multiplies whichever schedule runs. Momentum is never cycled.
"""
import math

from .registry import Method, Option, register


def constant_lr(t, T, lr0):
    return lr0


def step_lr(t, T, lr0, every=1 / 3, gamma=0.1, floor=0.0):
    size = max(1, round(every * T))  # steps between drops
    lo = floor * lr0
    return lo + (lr0 - lo) * gamma ** (t // size)


def exponential_lr(t, T, lr0, final=0.01):
    return lr0 * final ** (t / T)  # gamma = final^(1/T) per step


def cosine_lr(t, T, lr0, floor=0.0):
    lo = floor * lr0
    return lo + (lr0 - lo) * (1 + math.cos(math.pi * t / T)) / 2


def cyclical_lr(t, T, lr0, half=0.125, floor=0.1):
    """Triangular cycles between floor*lr0 and lr0, half a cycle = `half` of the run."""
    s = max(1, round(half * T))
    cycle = math.floor(1 + t / (2 * s))
    x = abs(t / s - 2 * cycle + 1)
    lo = floor * lr0
    return lo + (lr0 - lo) * max(0.0, 1 - x)


def sgdr_lr(t, T, lr0, first=1 / 15, mult=2, floor=0.0):
    """Cosine from lr0 to floor*lr0 in periods first*T, mult*first*T, ...; restart at lr0."""
    t0 = max(1, round(first * T))
    if mult == 1:
        tcur, ti = t % t0, t0
    else:
        k = int(math.log(t / t0 * (mult - 1) + 1, mult)) if t >= t0 else 0
        start = t0 * (mult ** k - 1) // (mult - 1)
        if start > t:  # float log rounding at a period boundary
            k -= 1
            start = t0 * (mult ** k - 1) // (mult - 1)
        tcur, ti = t - start, t0 * mult ** k
    lo = floor * lr0
    return lo + (lr0 - lo) * (1 + math.cos(math.pi * tcur / ti)) / 2


def onecycle_lr(t, T, lr0, pct=0.3, div=25.0, final_div=1e4):
    """Cosine up from lr0/div to lr0 over pct of the steps, then down to lr0/(div*final_div)."""
    init, low = lr0 / div, lr0 / (div * final_div)
    end1 = pct * T - 1
    if t <= end1:
        a, b, frac = init, lr0, t / end1
    else:
        a, b, frac = lr0, low, (t - end1) / (T - 1 - end1)
    return b + (a - b) / 2 * (math.cos(math.pi * frac) + 1)


def warmup_factor(t, T, frac=0.05):
    W = max(1, round(frac * T))
    return min(1.0, (t + 1) / W)


class Schedule:
    fn = None

    def __init__(self, opts, **ctx):
        self.opts = opts

    def lr(self, ctx):
        return type(self).fn(ctx.step, ctx.total_steps, ctx.base_lr, **self.opts)


def _switch(fn):
    return type(fn.__name__, (Schedule,), {"fn": staticmethod(fn)})


Constant, Step, Exponential, Cosine = _switch(constant_lr), _switch(step_lr), _switch(exponential_lr), \
    _switch(cosine_lr)
Cyclical, SGDR, OneCycle = _switch(cyclical_lr), _switch(sgdr_lr), _switch(onecycle_lr)


class Warmup:
    def __init__(self, opts, **ctx):
        self.frac = opts["frac"]

    def lr(self, ctx):
        return ctx.lr * warmup_factor(ctx.step, ctx.total_steps, self.frac)


def _no_lr_end(cfg, opts):
    if cfg.optim.lr_end is not None:
        return (f"replaces the linear decay optim.lr -> optim.lr_end={cfg.optim.lr_end}; "
                f"set optim.lr_end=none")
    return None


FLOOR = Option(0.0, "fraction of optim.lr", "lowest rate", 0.0, 1.0)
_S = dict(kind="schedule", touches=("schedule",), hooks=("lr",), slot="schedule", check=_no_lr_end,
          interactions="replaces the linear optim.lr -> optim.lr_end decay, so it needs optim.lr_end=none "
                       "(registry.with_method clears it); warmup multiplies it.")


def _reg(name, impl, summary, what, paper, oracle, options=None):
    register(Method(name, summary=summary, what=what, paper=paper, oracle=oracle, impl=f"schedules:{impl}",
                    options=options or {}, **_S))


_reg("constant", "Constant", "lr = optim.lr at every step", "No decay: every step uses optim.lr.",
     "-", "the value optim.lr at every step")
_reg("step", "Step", "lr drops by gamma every `every` of the run",
     "lr = floor + (lr0 - floor) gamma^floor(t / (every T)): drops at 1/3 and 2/3 of the run by default.",
     "Krizhevsky, Sutskever & Hinton 2012; He et al. 2016", "torch.optim.lr_scheduler.StepLR, every step",
     {"every": Option(1 / 3, "fraction of steps", "between drops", 1e-6, 1.0),
      "gamma": Option(0.1, "", "factor per drop", 0.0, 1.0), "floor": FLOOR})
_reg("exponential", "Exponential", "lr = lr0 final^(t/T): exponential decay to `final` lr0",
     "Multiply the rate by gamma = final^(1/T) after every step.", "-",
     "torch.optim.lr_scheduler.ExponentialLR with gamma final^(1/T)",
     {"final": Option(0.01, "fraction of optim.lr", "rate at the end of the run", 1e-9, 1.0)})
_reg("cosine", "Cosine", "cosine from optim.lr to floor over the run",
     "lr = floor + (lr0 - floor)(1 + cos(pi t / T)) / 2, one half-period over the whole run.",
     "Loshchilov & Hutter 2017 (without restarts)", "torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T)",
     {"floor": FLOOR})
_reg("cyclical", "Cyclical", "triangular cycles between floor and optim.lr; momentum is not cycled",
     "Triangular cyclical rates: up from floor*lr0 to lr0 and back, half a cycle lasting `half` of the run "
     "(4 cycles by default). Unlike torch's CyclicLR default, momentum is left alone.",
     "Smith 2017, 'Cyclical Learning Rates for Training Neural Networks'",
     "torch.optim.lr_scheduler.CyclicLR(mode='triangular', cycle_momentum=False)",
     {"half": Option(0.125, "fraction of steps", "half a cycle", 1e-6, 1.0),
      "floor": Option(0.1, "fraction of optim.lr", "lowest rate", 0.0, 1.0)})
_reg("sgdr", "SGDR", "cosine with warm restarts; periods first*T, mult*first*T, ...",
     "Stochastic gradient descent with warm restarts: cosine decay to floor in each period, then back to "
     "optim.lr. With the defaults (first 1/15, mult 2) periods of 1, 2, 4, 8 fifteenths end with the run.",
     "Loshchilov & Hutter 2017, 'SGDR'", "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
     {"first": Option(1 / 15, "fraction of steps", "first period", 1e-6, 1.0),
      "mult": Option(2, "", "period growth factor", 1, 10), "floor": FLOOR})
_reg("onecycle", "OneCycle", "one cycle: cosine up to optim.lr over pct, then far down",
     "Warm up by cosine from lr0/div to lr0 over pct of the run, then anneal to lr0/(div*final_div). "
     "Momentum is not cycled.", "Smith & Topin 2019, 'Super-Convergence'",
     "torch.optim.lr_scheduler.OneCycleLR(cycle_momentum=False)",
     {"pct": Option(0.3, "fraction of steps", "rising phase", 0.01, 0.99),
      "div": Option(25.0, "", "initial rate is optim.lr / div", 1.0, 1e6),
      "final_div": Option(1e4, "", "final rate is optim.lr / (div final_div)", 1.0, 1e9)})
register(Method(
    "warmup", kind="schedule", touches=("schedule",), hooks=("lr",), impl="schedules:Warmup",
    summary="linear warm-up: lr times (t+1)/W over the first frac of the run",
    options={"frac": Option(0.05, "fraction of steps", "warm-up length W / T", 0.0, 1.0)},
    what="Multiplies the rate of whichever schedule runs (a schedule method, or optim.lr -> optim.lr_end) by "
         "min(1, (t+1)/W): from lr/W at the first step to the full rate at step W-1.",
    interactions="composes with every schedule (runs after it at the lr hook).",
    paper="Goyal et al. 2017, 'Accurate, Large Minibatch SGD'",
    oracle="torch.optim.lr_scheduler.LinearLR(start_factor=1/W, total_iters=W-1)"))
