"""Gradient methods: sharpness-aware minimization (SAM) and adaptive gradient clipping (AGC).

Both run at the after_backward hook, SAM first (it replaces the gradient by the one at
the perturbed weights), then AGC (which clips whatever gradient reaches it), then the
optimizer steps.
"""
import torch

from .registry import Method, Option, register


def sam_perturbation(g: torch.Tensor, rho: float) -> torch.Tensor:
    """e = rho g / ||g||_2 over all parameters of each replica: g (P,) or (R, P), one norm per row."""
    return g * (rho / (g.norm(dim=-1, keepdim=True) + 1e-12))


def unitwise_norm(t: torch.Tensor, elementwise: bool, lead: int = 0) -> torch.Tensor:
    """Per output unit: the norm over all axes after the first `lead` (replica) axes and the
    unit axis (weights, (..., out, ...)); |t| for biases and other 1-value-per-unit tensors.
    Shaped to broadcast against t."""
    if elementwise or t.ndim <= lead + 1:
        return t.abs()
    return t.flatten(lead + 1).norm(dim=lead + 1).view(*t.shape[:lead + 1], *([1] * (t.ndim - lead - 1)))


@torch.no_grad()
def agc_(weights: dict, grads: dict, clip: float, eps: float, skip=(), lead: int = 0) -> None:
    """In place on grads: g <- g * min(1, clip * max(||w||, eps) / ||g||) per unit (Brock et al. 2021).
    lead: leading replica axes of every tensor (1 for a population's (R, ...) views)."""
    for n, w in weights.items():
        if n in skip:
            continue
        g = grads[n]
        elem = n.endswith("_b") or w.ndim <= lead + 1
        max_norm = unitwise_norm(w, elem, lead).clamp_min(eps) * clip
        gn = unitwise_norm(g, elem, lead)
        g.copy_(torch.where(gn > max_norm, g * (max_norm / gn.clamp_min(1e-6)), g))


class SAM:
    replays_batch = True  # its second gradient needs the batch's model noise again (the engine keeps it)

    def __init__(self, opts, **ctx):
        self.rho = opts["rho"]

    def after_backward(self, ctx):
        e = sam_perturbation(ctx.g, self.rho)
        w0 = ctx.w.clone()
        with torch.no_grad():
            ctx.w.add_(e)
        g2 = ctx.closure(second=True)  # same batch, same noise; BatchNorm statistics frozen
        with torch.no_grad():
            ctx.w.copy_(w0)
        ctx.g.copy_(g2)


class AGC:
    def __init__(self, opts, **ctx):
        self.clip, self.eps = opts["clip"], opts["eps"]

    def after_backward(self, ctx):
        agc_(ctx.views, ctx.gviews, self.clip, self.eps, skip=ctx.final_names, lead=1)


register(Method(
    "sam", kind="optimizer", touches=("gradients", "optimizer"), hooks=("after_backward",),
    summary="sharpness-aware minimization: step with the gradient at w + rho g/||g||",
    impl="gradients:SAM", options={"rho": Option(0.05, "L2 radius in weight space", "", 0.0, 10.0)},
    what="Two gradients per step: g at w, then g' at w + rho g / ||g|| (one norm over all the replica's "
         "weights); the weights return to w and the optimizer steps with g'. The second forward pass sees "
         "the same batch and the same dropout/stochastic-depth noise, and BatchNorm running statistics are "
         "not updated by it. Costs one more forward and backward per step.",
    interactions="wraps whichever optimizer the run uses; AGC clips g' (AGC runs after SAM).",
    paper="Foret, Kleiner, Mobahi & Neyshabur 2021, 'Sharpness-Aware Minimization'",
    oracle="autograd at the perturbed weights by hand: same update; BatchNorm buffers as after one pass"))
register(Method(
    "agc", kind="optimizer", touches=("gradients",), hooks=("after_backward",),
    summary="adaptive gradient clipping per output unit: ||g|| <= clip * max(||w||, eps)",
    impl="gradients:AGC",
    options={"clip": Option(0.01, "ratio ||g||/||w||", "lambda", 0.0, 100.0),
             "eps": Option(1e-3, "weight norm floor", "", 0.0, 1.0)},
    what="For each output unit (a weight tensor's first axis; each bias value alone), rescale the gradient "
         "when its norm exceeds clip times the unit's weight norm (floored at eps). The final layer "
         "(out_w, out_b; head_w, head_b for the ViT) is not clipped, as in the paper.",
    paper="Brock, De, Smith & Simonyan 2021, 'High-Performance Large-Scale Image Recognition Without "
          "Normalization' (NFNets)",
    oracle="the paper's formula unit by unit in a Python loop"))
