"""Weight averaging: SWA (equal average of end-of-pass weights) and EMA (every step).

Training continues on the raw weights; evaluation, params() and the weights hash use
the average. When the model has BatchNorm, the engine recomputes its running
statistics for the averaged weights (one forward over the training set, cumulative
average of the batch statistics, no noise) before evaluating, as torch's update_bn does.
"""
import torch

from .registry import Method, Option, register


def swa_update_(avg: torch.Tensor, w: torch.Tensor, count: int) -> None:
    """Running equal average: avg <- avg + (w - avg) / (count + 1), count snapshots in avg so far."""
    if count == 0:
        avg.copy_(w)
    else:
        avg.add_(w - avg, alpha=1.0 / (count + 1))


def ema_update_(avg: torch.Tensor, w: torch.Tensor, decay: float) -> None:
    """avg <- decay avg + (1 - decay) w."""
    avg.lerp_(w, 1.0 - decay)


class SWA:
    def __init__(self, opts, **ctx):
        self.start, self.avg, self.count = opts["start"], None, 0

    def pass_end(self, ctx):
        if ctx.pass_idx + 1 > self.start * ctx.passes:
            if self.avg is None:
                self.avg = torch.zeros_like(ctx.w)
            with torch.no_grad():
                swa_update_(self.avg, ctx.w, self.count)
            self.count += 1

    def eval_weights(self, ctx):
        return self.avg if self.count > 0 else None

    def state(self):
        return {"count": self.count} if self.avg is None else {"count": self.count, "avg": self.avg}

    def load_state(self, d):
        self.count = int(d["count"])
        self.avg = torch.as_tensor(d["avg"]).clone() if "avg" in d else None


class EMA:
    def __init__(self, opts, **ctx):
        self.decay, self.avg = opts["decay"], None

    def after_step(self, ctx):
        with torch.no_grad():
            if self.avg is None:
                self.avg = ctx.w.detach().clone()
            else:
                ema_update_(self.avg, ctx.w, self.decay)

    def eval_weights(self, ctx):
        return self.avg

    def state(self):
        return {} if self.avg is None else {"avg": self.avg}

    def load_state(self, d):
        self.avg = torch.as_tensor(d["avg"]).clone() if "avg" in d else None


register(Method(
    "swa", kind="averaging", touches=("weights-after-step",), hooks=("pass_end", "eval"), slot="average",
    impl="averaging:SWA", summary="stochastic weight averaging of end-of-pass weights from `start` on",
    options={"start": Option(0.75, "fraction of passes", "average passes after this point", 0.0, 0.9999)},
    what="Equal average of the weights at the end of every pass p+1 > start * passes; the average is what is "
         "evaluated and returned (BatchNorm statistics recomputed for it). The schedule is left as it is: "
         "pair with constant or cyclical rates for the paper's recipe.",
    paper="Izmailov, Podoprikhin, Garipov, Vetrov & Wilson 2018, 'Averaging Weights Leads to Wider Optima'",
    oracle="torch.optim.swa_utils.AveragedModel updated at the same passes"))
register(Method(
    "ema", kind="averaging", touches=("weights-after-step",), hooks=("after_step", "eval"), slot="average",
    impl="averaging:EMA", summary="exponential moving average of the weights after every step",
    options={"decay": Option(0.999, "per step", "weight of the old average", 0.0, 1.0)},
    what="avg <- decay avg + (1 - decay) w after every optimizer step (avg = w after the first step); the "
         "average is evaluated and returned, with BatchNorm statistics recomputed for it. Half-life "
         "ln 2 / (1 - decay) steps: 693 at the default, about 3 passes at batch 32.",
    paper="Polyak & Juditsky 1992; Tarvainen & Valpola 2017 (mean teacher)",
    oracle="torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(decay)"))
