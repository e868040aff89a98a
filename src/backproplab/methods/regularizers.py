"""Regularizers: penalties, decoupled decay, label smoothing, and the noise switches.

The noise maths (dropout, DropConnect, spatial dropout, stochastic depth) lives beside
the layers it acts on, in models/modnet.py (dropout_mask, drop_path, dropconnect_linear);
those switches only set the rate in the model's spec at the build hook. The noise is
drawn from the replica's (seed, pass) generator in a fixed order, so a resumed run and
SAM's second forward pass see the same masks.
"""
import torch
import torch.nn.functional as F

from .registry import Method, Option, register


def l1_penalty(params, lam: float) -> torch.Tensor:
    return lam * sum(p.abs().sum() for p in params)


def l2_penalty(params, lam: float) -> torch.Tensor:
    # gradient lam * w: the same as torch.optim's (coupled) weight_decay=lam
    return 0.5 * lam * sum((p * p).sum() for p in params)


def l1_grad(w: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * torch.sign(w)  # autograd's subgradient of |w|: 0 at 0


def l2_grad(w: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * w


def smooth_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., B, 10) logits, (B,) labels -> (...) mean over the batch of (1-eps) CE(y) + eps * mean_k CE(k)."""
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return ((1 - eps) * nll - eps * logp.mean(-1)).mean(-1)


class L1:
    """On the autograd path the penalty joins the loss (loss hook); the fast paths, whose kernels
    return only the data term's gradient, add the penalty's gradient to it (penalty_grad), at the
    weights the gradient was taken at (SAM's perturbed ones too)."""
    penalty, grad = staticmethod(l1_penalty), staticmethod(l1_grad)

    def __init__(self, opts, **ctx):
        self.lam = opts["lam"]

    def loss(self, ctx, out, labels, value):  # value (R,); ctx.params: each replica's parameter list
        return value + torch.stack([type(self).penalty(ps, self.lam) for ps in ctx.params])

    def penalty_grad(self, w):  # (R, P) -> (R, P)
        return type(self).grad(w, self.lam)


class L2(L1):
    penalty, grad = staticmethod(l2_penalty), staticmethod(l2_grad)


class DecoupledDecay:
    def __init__(self, opts, **ctx):
        self.wd = opts["wd"]

    def before_step(self, ctx):
        with torch.no_grad():
            ctx.w.mul_(1 - ctx.lr * self.wd)


class LabelSmoothing:
    def __init__(self, opts, **ctx):
        self.eps = opts["eps"]
        self.fused_smooth = self.eps  # the fused path's cross-entropy takes the same target

    def criterion(self, out, labels):  # replaces the plain cross-entropy; penalties still add to it
        return smooth_cross_entropy(out, labels, self.eps)


class ModelRate:
    """Sets one rate of the ModNet spec at the build hook."""
    key = None

    def __init__(self, opts, **ctx):
        self.p = opts["p"]

    def build(self, spec):
        spec[self.key] = self.p


class Dropout(ModelRate):
    key = "drop"


class DropConnect(ModelRate):
    key = "dropconnect"


class SpatialDropout(ModelRate):
    key = "spatial"


class StochasticDepth(ModelRate):
    key = "drop_path"


def _ce_only(cfg, opts):
    return None if cfg.train.loss == "ce" else f"needs train.loss=ce, not {cfg.train.loss}"


def _no_model_dropout(cfg, opts):
    if cfg.model.dropout > 0:
        return f"model.dropout={cfg.model.dropout} already drops H2's outputs; set model.dropout=0"
    return None


LAM = "per parameter, on the batch-mean loss"
P = lambda d, what: {"p": Option(d, "probability", what, 0.0, 0.95)}  # noqa: E731
_REG = dict(kind="regularizer")

register(Method("l1", touches=("loss",), hooks=("loss",), impl="regularizers:L1", **_REG,
                summary="L1 penalty lam * sum |w| on every parameter", options={"lam": Option(1e-5, LAM, "", 0.0, 1.0)},
                what="Adds lam * sum |w| over all parameters to the batch loss; pushes small weights to zero.",
                paper="Tibshirani 1996 (lasso); Williams 1995", oracle="autograd of the formula: gradient lam*sign(w)"))
register(Method("l2", touches=("loss",), hooks=("loss",), impl="regularizers:L2", **_REG,
                summary="L2 penalty lam/2 * sum w^2 (coupled weight decay)",
                options={"lam": Option(1e-4, LAM, "", 0.0, 1.0)},
                what="Adds lam/2 * sum w^2 over all parameters to the batch loss, so the gradient gains lam*w "
                     "(coupled decay: adaptive optimizers rescale it; compare wd).",
                paper="Hinton 1987; Krogh & Hertz 1992", oracle="torch.optim.SGD(weight_decay=lam): same trajectory"))
register(Method("wd", touches=("weights-after-step", "optimizer"), hooks=("before_step",), **_REG,
                impl="regularizers:DecoupledDecay", summary="decoupled weight decay w <- w (1 - lr wd)",
                options={"wd": Option(0.01, "per unit lr per step", "", 0.0, 10.0)},
                what="Shrinks every parameter by lr * wd right before the optimizer's update, outside the "
                     "gradient (so Adam's scaling does not touch it). adam + wd is AdamW.",
                paper="Loshchilov & Hutter 2019, 'Decoupled Weight Decay Regularization'",
                oracle="adam + wd against torch.optim.AdamW: same trajectory"))
register(Method("dropout", touches=("model",), hooks=("build", "forward"), impl="regularizers:Dropout",
                modnet=True, fast_model=("kernel", "fused"), check=_no_model_dropout,
                options=P(0.25, "of dropping each H2 output"), **_REG,
                summary="dropout on the 192 H2 outputs (before H3), scaled 1/(1-p)",
                what="Each of H2's 192 outputs is zeroed with probability p per example and the rest scaled by "
                     "1/(1-p) while training; nothing at evaluation. Masks come from the engine's (seed, pass) "
                     "stream (model.dropout does the same with train()'s stream: use one of the two).",
                paper="Hinton et al. 2012; Srivastava et al. 2014", oracle="the mask formula: kept units scaled "
                "1/(1-p), dropped units zero, drop rate within 4 sigma of p"))
register(Method("dropconnect", touches=("model",), hooks=("build", "forward"), impl="regularizers:DropConnect",
                modnet=True, fast_model=("kernel",), options=P(0.25, "of dropping each H3 weight"), **_REG,
                summary="DropConnect on H3's 192x30 weights, per example",
                what="Each weight of the fully connected H3 layer is zeroed with probability p, independently "
                     "per example, and the kept ones scaled 1/(1-p); the mean weights at evaluation. The B x 5,760 "
                     "draws of a step are a splitmix64 hash of one key from the replica's noise stream "
                     "(models/noise.py: 16 bits a draw, the rate p to within 2^-17), the same on every path.",
                paper="Wan, Zeiler, Zhang, LeCun & Fergus 2013", oracle="a per-example Python loop with the same "
                "masks (the hash written out in Python)"))
register(Method("spatial_dropout", touches=("model",), hooks=("build", "forward"), modnet=True, **_REG,
                fast_model=("kernel",),
                impl="regularizers:SpatialDropout", options=P(0.1, "of dropping each H1 feature map"),
                summary="spatial dropout: whole H1 feature maps dropped per example",
                what="Each of H1's 12 feature maps (8x8) is zeroed with probability p per example and the others "
                     "scaled 1/(1-p); neighbouring pixels are correlated, so dropping them one by one does "
                     "little.", paper="Tompson, Goroshin, Jain, LeCun & Bregler 2015",
                oracle="the mask formula: each map all-zero or all-scaled"))
register(Method("stochastic_depth", touches=("model",), hooks=("build", "forward"), modnet=True, **_REG,
                impl="regularizers:StochasticDepth", requires=("resblocks",),
                options=P(0.1, "of dropping the last residual branch"),
                summary="stochastic depth: drop residual branches per example, rate rising to p",
                what="Residual block l of L skips its branch for an example with probability p * l / L (linear "
                     "decay rule) and scales it by 1/(1 - p l/L) when kept; the full net at evaluation.",
                paper="Huang, Sun, Liu, Sedra & Weinberger 2016, 'Deep Networks with Stochastic Depth'",
                oracle="timm's drop_path formula: per-example mask, kept branches scaled"))
register(Method("label_smoothing", touches=("loss",), hooks=("loss",), impl="regularizers:LabelSmoothing",
                check=_ce_only, **_REG, options={"eps": Option(0.1, "probability mass", "spread over 10 classes",
                                                               0.0, 1.0)},
                summary="label smoothing: cross-entropy against (1-eps) one-hot + eps/10",
                what="Replaces the cross-entropy target by (1 - eps) on the label plus eps spread evenly over "
                     "the 10 classes. Needs train.loss=ce.",
                paper="Szegedy et al. 2016, 'Rethinking the Inception Architecture'",
                oracle="torch.nn.functional.cross_entropy(label_smoothing=eps)"))
