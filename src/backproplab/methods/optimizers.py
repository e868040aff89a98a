"""Optimizers: the update maths as pure functions on flat tensors, and their switches.

Each *_update(w, g, st, lr, ...) changes w (and the state dict st) in place, following
torch.optim's formulas and defaults exactly (tests compare trajectories step by step).
w and g are (P,) for one replica or (R, P) for a population; lr is a float or an (R, 1)
column (one rate per replica). Every update is elementwise, so a population's rows are
R independent optimizers that step together (one shared step count). A switch holds the
population's state; the engine calls step(ctx) once per batch with ctx.w the (R, P)
weights, ctx.g the (R, P) gradient (mean over each replica's batch) and ctx.lr.
"""
import torch

from .registry import Method, Option, register


def _descend(w, d, lr):
    """w <- w - lr d; lr a float or a column broadcast over the rows."""
    if torch.is_tensor(lr):
        w.sub_(d * lr.to(w.dtype))
    else:
        w.add_(d, alpha=-lr)


def sgd_update(w, g, st, lr):
    _descend(w, g, lr)


def momentum_update(w, g, st, lr, momentum=0.9, nesterov=False):
    # torch.optim.SGD, dampening 0: buf <- mu buf + g (buf = g on the first step)
    if "buf" not in st:
        st["buf"] = g.clone()
    else:
        st["buf"].mul_(momentum).add_(g)
    _descend(w, g.add(st["buf"], alpha=momentum) if nesterov else st["buf"], lr)


def adagrad_update(w, g, st, lr, eps=1e-10):
    st.setdefault("sum", torch.zeros_like(w)).addcmul_(g, g)
    if torch.is_tensor(lr):
        _descend(w, g / st["sum"].sqrt().add_(eps), lr)
    else:
        w.addcdiv_(g, st["sum"].sqrt().add_(eps), value=-lr)


def adadelta_update(w, g, st, lr, rho=0.9, eps=1e-6):
    sq = st.setdefault("square_avg", torch.zeros_like(w))
    acc = st.setdefault("acc_delta", torch.zeros_like(w))
    sq.mul_(rho).addcmul_(g, g, value=1 - rho)
    delta = acc.add(eps).sqrt_().div_(sq.add(eps).sqrt_()).mul_(g)
    acc.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    _descend(w, delta, lr)


def rmsprop_update(w, g, st, lr, alpha=0.99, eps=1e-8, momentum=0.0):
    sq = st.setdefault("square_avg", torch.zeros_like(w))
    sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    avg = sq.sqrt().add_(eps)
    if momentum > 0:
        buf = st.setdefault("buf", torch.zeros_like(w))
        buf.mul_(momentum).addcdiv_(g, avg)
        _descend(w, buf, lr)
    elif torch.is_tensor(lr):
        _descend(w, g / avg, lr)
    else:
        w.addcdiv_(g, avg, value=-lr)


def adam_update(w, g, st, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """Adam; weight_decay > 0 makes it AdamW (decoupled: w <- w (1 - lr wd) before the step).
    The step is torch.optim's own fused kernel, the op torch.optim.AdamW(fused=True) calls: one
    pass over w, g and the moments instead of eight elementwise ops, which at 8 replicas of
    Net1989 on the kernel path cost ~12% of a step (the kernels evict the buffers between
    steps; benchmarks/bench_engine.py; the functional torch.optim.adam.adam(fused=True) adds
    ~50 us a call of Python and gained nothing). A population's rows round exactly as a solo
    replica's (P,) would: the (R, P) buffers go in whole only where no vector tail or thread's
    chunk can fall inside a row (one thread, P a multiple of 16), else as R row tensors; an
    (R, 1) column of rates takes one call per distinct rate."""
    st["step"] = st.get("step", 0) + 1
    if "exp_avg" not in st:
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(w), torch.zeros_like(w)
    ts = (w, g.contiguous(), st["exp_avg"], st["exp_avg_sq"])
    rates = None
    if torch.is_tensor(lr):
        rates = lr.detach().double().cpu().reshape(-1).tolist()
        if len(set(rates)) == 1:
            lr, rates = rates[0], None
    if rates is None and (w.ndim == 1 or (w.shape[-1] % 16 == 0 and torch.get_num_threads() == 1
                                          and all(t.is_contiguous() for t in ts))):
        calls = [(float(lr), [[t] for t in ts])]
    else:
        rows = [list(t.unbind(0)) for t in ts]
        groups = {}
        for r, v in enumerate(rates if rates is not None else [float(lr)] * w.shape[0]):
            groups.setdefault(v, []).append(r)
        calls = [(v, [[t[r] for r in rs] for t in rows]) for v, rs in groups.items()]
    step = torch.tensor(float(st["step"]), device=w.device)   # the caller counts (torch.optim does it first)
    for rate, (ws, gs, ms, vs) in calls:
        torch._fused_adamw_(ws, gs, ms, vs, [], [step] * len(ws), lr=rate, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


class _Optimizer:
    fn = None

    def __init__(self, opts, **ctx):
        self.opts, self.st = opts, {}

    def step(self, ctx):
        type(self).fn(ctx.w, ctx.g, self.st, ctx.lr, **self.opts)

    def state(self):
        return dict(self.st)

    def load_state(self, d):
        self.st = {k: (int(v) if k == "step" else torch.as_tensor(v).clone()) for k, v in d.items()}


class SGD(_Optimizer):
    fn = staticmethod(sgd_update)


class Momentum(_Optimizer):
    fn = staticmethod(lambda w, g, st, lr, momentum: momentum_update(w, g, st, lr, momentum, False))


class Nesterov(_Optimizer):
    fn = staticmethod(lambda w, g, st, lr, momentum: momentum_update(w, g, st, lr, momentum, True))


class AdaGrad(_Optimizer):
    fn = staticmethod(adagrad_update)


class AdaDelta(_Optimizer):
    fn = staticmethod(adadelta_update)


class RMSprop(_Optimizer):
    fn = staticmethod(rmsprop_update)


class Adam(_Optimizer):
    fn = staticmethod(adam_update)


class AdamThenSGD(_Optimizer):
    """Adam until a fraction `at` of the steps, then SGD with momentum from the same weights
    (Keskar & Socher 2017 switch, with a fixed SGD rate instead of their estimate)."""

    def step(self, ctx):
        o = self.opts
        if ctx.step < int(o["at"] * ctx.total_steps):
            adam_update(ctx.w, ctx.g, self.st, ctx.lr, o["beta1"], o["beta2"], o["eps"])
        else:  # the schedule still applies: sgd_lr scaled by the schedule's multiplier
            sgd_st = {"buf": self.st["buf"]} if "buf" in self.st else {}
            momentum_update(ctx.w, ctx.g, sgd_st, o["sgd_lr"] * ctx.lr / ctx.base_lr, o["momentum"])
            self.st["buf"] = sgd_st["buf"]


class SDLM(_Optimizer):
    """The 1989 diagonal Levenberg-Marquardt on a plain net1989 (wraps methods/sdlm.py): the
    Gauss-Newton diagonal estimate is averaged over the examples of the batch. The estimate
    is per example and additive: on the kernel path the solo kernel sums it with the gradient
    (ctx.curvature, already the batch mean); elsewhere one batched net1989_gn_diag call per
    replica sums it over the batch. The update is elementwise, so it runs once on the whole
    (R, P) population, the running average h one (R, P) buffer (st: its per-parameter views)."""
    needs_inputs = True     # reads each replica's batch as the model sees it (the engine supplies it)
    needs_curvature = True  # the kernel path's ctx.curvature, when the engine can give it
    h = None

    def step(self, ctx):
        from .sdlm import net1989_gn_diag, sdlm_update
        m, names = ctx.cfg.model, ctx.param_names
        if self.h is None:   # first step, or after load_state: st's tensors into one buffer
            self.h = (torch.cat([self.st[n].reshape(ctx.R, -1) for n in names], 1) if self.st
                      else torch.zeros_like(ctx.w))
            self.st = ctx.views_of(self.h)                        # name: (R, *shape)
        H = getattr(ctx, "curvature", None)   # (R, P) batch means; other engines' contexts have none
        if H is None:
            rows = []
            for r in range(ctx.R):
                p = {n: ctx.views[n][r].detach() for n in names}
                x, keep = ctx.x[r], None if ctx.keep is None else ctx.keep[r]
                est = net1989_gn_diag(p, x, m.act, m.out_act, ctx.cfg.train.loss, keep, m.dropout)
                rows.append(torch.cat([est[n].reshape(-1) for n in names]) / len(x))
            H = torch.stack(rows)
        with torch.no_grad():   # lr: a float, or an (R, 1) column broadcast over each replica's row
            sdlm_update(ctx.w, ctx.g, self.h, H, ctx.lr, self.opts["mu"], self.opts["gamma"])

    def load_state(self, d):
        self.st, self.h = {k: torch.as_tensor(v).clone() for k, v in d.items()}, None


T = ("optimizer",)
H = ("step",)
TORCH = "torch.optim.{} on the same gradients: identical trajectory over 6 steps"
MOM = Option(0.9, "", "momentum coefficient mu", 0.0, 0.9999)
BETAS = {"beta1": Option(0.9, "", "first-moment decay", 0.0, 0.9999),
         "beta2": Option(0.999, "", "second-moment decay", 0.0, 0.999999),
         "eps": Option(1e-8, "", "added to the root of the second moment", 0.0, 1.0)}
_ONE = dict(kind="optimizer", touches=T, hooks=H, slot="optimizer")

register(Method("sgd", summary="plain SGD: w <- w - lr g", impl="optimizers:SGD", **_ONE,
                what="Stochastic gradient descent on the batch-mean gradient; lr is optim.lr after the schedule. "
                     "An optimizer method replaces optim.name and its hyperparameters (beta1, beta2, eps, "
                     "weight_decay, mu, gamma); optim.lr and the schedule still set the rate.",
                paper="Robbins & Monro 1951; Rumelhart, Hinton & Williams 1986", oracle=TORCH.format("SGD")))
register(Method("momentum", summary="heavy-ball momentum: buf <- mu buf + g; w <- w - lr buf",
                impl="optimizers:Momentum", options={"momentum": MOM}, **_ONE,
                what="Polyak's heavy ball as torch.optim.SGD writes it (dampening 0, buf = g on the first step).",
                paper="Polyak 1964; Sutskever et al. 2013", oracle=TORCH.format("SGD(momentum=0.9)")))
register(Method("nesterov", summary="Nesterov momentum: w <- w - lr (g + mu buf)", impl="optimizers:Nesterov",
                options={"momentum": MOM}, **_ONE,
                what="Nesterov's accelerated gradient in the look-ahead form torch.optim.SGD(nesterov=True) uses.",
                paper="Nesterov 1983; Sutskever et al. 2013", oracle=TORCH.format("SGD(nesterov=True)")))
register(Method("adagrad", summary="AdaGrad: w <- w - lr g / (sqrt(sum g^2) + eps)", impl="optimizers:AdaGrad",
                options={"eps": Option(1e-10, "", "added to the root of the sum", 0.0, 1.0)}, **_ONE,
                what="Per-weight rate shrinking with the sum of all past squared gradients; no lr decay.",
                paper="Duchi, Hazan & Singer 2011", oracle=TORCH.format("Adagrad")))
register(Method("adadelta", summary="AdaDelta: unit-correct steps from running RMS of g and of past steps",
                impl="optimizers:AdaDelta", **_ONE,
                options={"rho": Option(0.9, "", "running-average decay", 0.0, 0.9999),
                         "eps": Option(1e-6, "", "inside both roots", 0.0, 1.0)},
                what="delta = sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) * g, w <- w - lr delta. The paper has no "
                     "lr (lr = 1, torch's default): set optim.lr=1.0 to run it as published.",
                paper="Zeiler 2012", oracle=TORCH.format("Adadelta")))
register(Method("rmsprop", summary="RMSprop: w <- w - lr g / (sqrt(E[g^2]) + eps)", impl="optimizers:RMSprop",
                **_ONE, options={"alpha": Option(0.99, "", "running-average decay of g^2", 0.0, 0.9999),
                                 "eps": Option(1e-8, "", "added to the root", 0.0, 1.0),
                                 "momentum": Option(0.0, "", "momentum on the scaled step", 0.0, 0.9999)},
                what="Divide the gradient by a running root mean square of recent gradients (torch's form: "
                     "eps outside the root, not centered).",
                paper="Tieleman & Hinton 2012, Coursera lecture 6.5", oracle=TORCH.format("RMSprop")))
register(Method("adam", summary="Adam: bias-corrected first and second moments", impl="optimizers:Adam",
                **_ONE, options=dict(BETAS),
                what="m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, w <- w - lr m_hat / (sqrt(v_hat) + eps); "
                     "no weight decay (see adamw, wd, l2).",
                paper="Kingma & Ba 2015", oracle=TORCH.format("Adam")))
register(Method("adamw", summary="AdamW: Adam with decoupled weight decay w <- w (1 - lr wd)",
                impl="optimizers:Adam", **_ONE,
                options={**BETAS, "weight_decay": Option(0.01, "per unit lr", "decoupled decay", 0.0, 10.0)},
                incompatible_with={"wd": "adamw already decays the weights (decoupled); use adam + wd instead"},
                what="Adam whose weight decay shrinks every parameter by lr * weight_decay before the update "
                     "instead of adding wd * w to the gradient. Without methods, optim.name=adamw runs this with "
                     "optim.beta1/beta2/eps/weight_decay.",
                paper="Loshchilov & Hutter 2019", oracle=TORCH.format("AdamW(weight_decay=0.01)")))
register(Method("adam_sgd", summary="Adam, then SGD with momentum from a fraction `at` of the steps",
                impl="optimizers:AdamThenSGD", **_ONE,
                options={**BETAS, "at": Option(0.5, "fraction of steps", "switch point", 0.0, 1.0),
                         "sgd_lr": Option(0.05, "per step", "SGD rate at schedule multiplier 1", 0.0, 100.0),
                         "momentum": MOM},
                what="Late switch from Adam to SGD: fast early progress, SGD's generalization at the end. The SGD "
                     "rate is sgd_lr times the schedule's current multiplier (lr / optim.lr); its momentum "
                     "buffer starts at the first SGD step. Adam's moments are kept in state but unused after.",
                paper="Keskar & Socher 2017, 'Improving generalization by switching from Adam to SGD'",
                oracle="torch.optim.Adam before the switch step and torch.optim.SGD(momentum) after it"))
register(Method("sdlm", summary="1989 diagonal Levenberg-Marquardt: w <- w - lr g / (mu + h)",
                impl="optimizers:SDLM", **_ONE,
                options={"mu": Option(0.02, "", "added to the curvature", 1e-9, 100.0),
                         "gamma": Option(0.01, "per step", "running-average weight of each new estimate",
                                         1e-9, 1.0)},
                check=lambda cfg, o: _sdlm_check(cfg),
                what="Each weight's step is lr / (mu + h), h a running average of a Gauss-Newton estimate of "
                     "d2E/dw2 back-propagated with squares (methods/sdlm.py); in a batch the per-example "
                     "estimates are averaged. Defined for the plain net1989 only. About B forward passes per step "
                     "on top of training: slow in large batches.",
                paper="LeCun et al. 1989; LeCun, Bottou, Orr & Mueller 1998 'Efficient BackProp' section 9.1",
                oracle="the eager per-example engine's sdlm at batch 1: same weights after 6 examples"))


def _sdlm_check(cfg):
    from .registry import get_method
    bad = [s.name for s in cfg.methods if get_method(s.name).modnet and s.name != "nonorm"]
    if cfg.model.name != "net1989":
        return f"needs model.name=net1989, not {cfg.model.name}"
    if bad:
        return f"needs the plain net1989; {', '.join(bad)} change the model"
    return None


# -- 2023-2024: Lion, Muon, Schedule-Free AdamW --------------------------------------------------
def _col(lr, like):
    """lr as a float, or an (R, 1) column reshaped to broadcast over a (R, ...) tensor `like`."""
    return lr.to(like.dtype).view(-1, *([1] * (like.ndim - 1))) if torch.is_tensor(lr) else lr


def lion_update(w, g, st, lr, beta1=0.9, beta2=0.99, weight_decay=0.0):
    """Lion: the step is the sign of an interpolation of momentum and gradient; the momentum
    then moves toward g with its own (slower) decay beta2."""
    m = st.setdefault("exp_avg", torch.zeros_like(w))
    d = torch.sign(m * beta1 + g * (1 - beta1))
    if weight_decay:
        d.add_(w, alpha=weight_decay)
    _descend(w, d, lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)


class Lion(_Optimizer):
    fn = staticmethod(lion_update)


NS5 = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz iteration's coefficients


def newton_schulz5(G, steps=5, eps=1e-7):
    """(..., rows, cols) -> the same shape, approximately U V^T of G = U S V^T: X = G / ||G||_F
    (one norm per matrix), then X <- a X + (b A + c A^2) X with A = X X^T, on the wide
    orientation (transposed when rows > cols)."""
    a, b, c = NS5
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT if tall else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):   # three batched products a step (baddbmm fuses the scalings and sums)
        A = torch.bmm(X, X.mT) if X.ndim == 3 else X @ X.mT
        if X.ndim == 3:
            X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
        else:
            X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon:
    """Muon on every weight matrix of the model but the final layer (a conv weight (O, I, k, k) as the
    (O, I k k) matrix), batched over the replicas: (R, rows, cols) Newton-Schulz products.
    Biases, gains and the final layer step with AdamW at lr * adam_ratio."""

    def __init__(self, opts, **ctx):
        self.opts, self.buf, self.adam = opts, {}, {}

    @staticmethod
    def matrices(ctx):
        # weights of two or more axes; biases (Net1989's h1_b, h2_b hold one value per unit of a
        # (12, 8, 8) map) and the final layer are not matrices here
        return [n for n in ctx.param_names
                if ctx.views[n].ndim >= 3 and not n.endswith("_b") and n not in ctx.final_names]

    def step(self, ctx):
        o = self.opts
        mats = self.matrices(ctx)
        R = ctx.w.shape[0]
        for n in mats:
            w, g = ctx.views[n], ctx.gviews[n]
            buf = self.buf.setdefault(n, torch.zeros_like(g))
            buf.lerp_(g, 1 - o["momentum"])
            u = g.lerp(buf, o["momentum"]) if o["nesterov"] else buf
            u = u.reshape(R, w.shape[1], -1)                        # (R, rows, cols)
            rows, cols = u.shape[-2:]
            d = newton_schulz5(u, o["ns_steps"]).mul_(max(1.0, rows / cols) ** 0.5).view_as(w)
            lr = _col(ctx.lr, w)
            if o["weight_decay"]:
                w.mul_(1 - lr * o["weight_decay"])
            w.sub_(d * lr)
        lr = ctx.lr * o["adam_ratio"]
        for n in ctx.param_names:
            if n not in mats:
                st = self.adam.setdefault(n, {})
                st["step"] = self._t   # adam_update counts it up to this step's number
                adam_update(ctx.views[n].reshape(R, -1), ctx.gviews[n].reshape(R, -1), st, lr, o["beta1"],
                            o["beta2"], o["eps"], o["weight_decay"])
        self._t += 1

    _t = 0  # steps taken (the AdamW part's bias correction)

    def state(self):
        st = {"step": self._t, **{f"buf.{n}": b for n, b in self.buf.items()}}
        for n, d in self.adam.items():
            st.update({f"adam.{n}.{k}": v for k, v in d.items() if k != "step"})
        return st

    def load_state(self, d):
        self._t = int(d.get("step", 0))
        self.buf = {k[4:]: torch.as_tensor(v).clone() for k, v in d.items() if k.startswith("buf.")}
        self.adam = {}
        for k, v in d.items():
            if k.startswith("adam."):
                n, key = k[5:].rsplit(".", 1)
                self.adam.setdefault(n, {})[key] = torch.as_tensor(v).clone()


class ScheduleFree:
    """Schedule-Free AdamW. The engine's weights W are y, the point where the gradient is taken;
    the state holds z (the AdamW iterate), x (the weighted average, what is evaluated) and the
    running sum of the squared rates that weights the average, one per replica."""

    def __init__(self, opts, **ctx):
        self.opts, self.st = opts, {}

    def step(self, ctx):
        o, st, w, g = self.opts, self.st, ctx.w, ctx.g
        if not st:
            st.update(z=w.detach().clone(), x=w.detach().clone(), v=torch.zeros_like(w), step=0,
                      lr2sum=torch.zeros(w.shape[0], 1, dtype=torch.float64))
        st["step"] += 1
        t, z, x, v = st["step"], st["z"], st["x"], st["v"]
        v.mul_(o["beta2"]).addcmul_(g, g, value=1 - o["beta2"])
        lr = torch.as_tensor(ctx.lr, dtype=torch.float64).expand(w.shape[0], 1)   # (R, 1)
        lr_t = lr * (1 - o["beta2"] ** t) ** 0.5                  # gamma_t: rate times the bias correction
        d = g / v.sqrt().add_(o["eps"])
        if o["weight_decay"]:
            d.add_(w, alpha=o["weight_decay"])                    # decay at y, as the paper has it
        z.sub_(d * lr_t.to(w.dtype))
        st["lr2sum"] += lr_t ** 2
        c = (lr_t ** 2 / st["lr2sum"]).to(w.dtype)               # c_{t+1} = gamma_t^2 / sum gamma_i^2
        x.lerp_(z, c)
        w.copy_(torch.lerp(z, x, o["beta1"]))                     # y = (1 - beta1) z + beta1 x

    def eval_weights(self, ctx):
        return self.st.get("x")

    def state(self):
        return dict(self.st)

    def load_state(self, d):
        self.st = {k: (int(v) if k == "step" else torch.as_tensor(v).clone()) for k, v in d.items()}


DECAYING = ("step", "exponential", "cosine", "cyclical", "sgdr", "onecycle")


def _sf_check(cfg, opts):
    if cfg.optim.lr_end is not None:
        return (f"has no schedule: the linear decay optim.lr -> optim.lr_end={cfg.optim.lr_end} contradicts "
                f"it; set optim.lr_end=none (warmup is allowed)")
    return None


register(Method(
    "lion", summary="Lion: w <- w - lr (sign(b1 m + (1-b1) g) + wd w); m <- b2 m + (1-b2) g",
    impl="optimizers:Lion", **_ONE,
    options={"beta1": Option(0.9, "", "interpolation of m and g inside the sign", 0.0, 0.9999),
             "beta2": Option(0.99, "", "momentum decay", 0.0, 0.9999),
             "weight_decay": Option(0.0, "per unit lr", "decoupled decay lambda", 0.0, 10.0)},
    what="Every weight moves by exactly lr per step (the sign of c = b1 m + (1-b1) g), plus the decoupled decay "
         "lr wd w; the momentum m (zero at the start) is updated after the step with the slower b2. Applied "
         "to every parameter. The sign update has a larger norm than Adam's: the paper uses a rate 3-10x "
         "smaller than AdamW's (and wd 3-10x larger, to keep lr * wd), e.g. optim.lr=3e-4 where AdamW runs "
         "at 2e-3. Sign steps make the trajectory sensitive to gradient rounding near c = 0.",
    paper="Chen et al. 2023, 'Symbolic Discovery of Optimization Algorithms'",
    oracle="the paper's update written out with torch.sign on autograd gradients: same weights after 6 steps"))
register(Method(
    "muon", summary="Muon: momentum orthogonalized by Newton-Schulz on the hidden matrices, AdamW elsewhere",
    impl="optimizers:Muon", **_ONE,
    options={"momentum": Option(0.95, "", "buf <- mu buf + (1-mu) g", 0.0, 0.9999),
             "nesterov": Option(True, "", "step along (1-mu) g + mu buf instead of buf"),
             "ns_steps": Option(5, "", "Newton-Schulz iterations", 1, 20),
             "adam_ratio": Option(0.1, "of lr", "AdamW's rate for the rest is lr * adam_ratio", 0.0, 100.0),
             "beta1": Option(0.9, "", "AdamW part", 0.0, 0.9999),
             "beta2": Option(0.95, "", "AdamW part", 0.0, 0.999999),
             "eps": Option(1e-10, "", "AdamW part", 0.0, 1.0),
             "weight_decay": Option(0.0, "per unit lr", "decoupled, on both parts", 0.0, 10.0)},
    what="Each matrix of the model but the final layer (Net1989: h1_w, h2_w, h3_w; a conv weight (O, I, k, k) "
         "as (O, I*k*k)) keeps a momentum buffer; the (Nesterov) update U is replaced by the quintic "
         "Newton-Schulz iteration's approximation of its orthogonal factor (X = U / ||U||_F, transposed "
         "when rows > cols, a, b, c = 3.4445, -4.7750, 2.0315), scaled by max(1, rows/cols)^0.5: "
         "w <- w - lr O. Biases, gains and the final layer (out_w, out_b) use AdamW at lr * adam_ratio, "
         "betas (0.9, 0.95), eps 1e-10 as the authors' auxiliary Adam. Float32 throughout (the reference "
         "runs Newton-Schulz in bfloat16); the products are batched over the replicas. Rates: Muon "
         "about 0.02 (optim.lr), which puts the AdamW part at this project's AdamW scale 2e-3.",
    paper="Jordan et al. 2024, 'Muon: An optimizer for hidden layers in neural networks' (blog post and code)",
    oracle="momentum, Newton-Schulz and scaling written out per matrix in plain torch, torch.optim.AdamW on "
           "the rest: same weights after 6 steps"))
register(Method(
    "schedule_free", summary="Schedule-Free AdamW: gradient at y, AdamW step on z, evaluate the average x",
    impl="optimizers:ScheduleFree", kind="optimizer", touches=("optimizer", "weights-after-step"),
    hooks=("step", "eval"), slot="optimizer",
    options={"beta1": Option(0.9, "", "y = (1-beta1) z + beta1 x", 0.0, 0.9999),
             "beta2": Option(0.999, "", "second-moment decay", 0.0, 0.999999),
             "eps": Option(1e-8, "", "added to the root of the second moment", 0.0, 1.0),
             "weight_decay": Option(0.0, "per unit lr", "decoupled, at y", 0.0, 10.0)},
    incompatible_with={**{s: "schedule_free replaces the decaying schedule; only constant or warmup rates"
                          for s in DECAYING},
                       "swa": "schedule_free evaluates its own average x", "ema": "schedule_free evaluates "
                       "its own average x",
                       "wd": "schedule_free recomputes the weights from z and x; use its weight_decay option"},
    check=_sf_check,
    what="No schedule: the weights trained on are y_t = (1-b1) z_t + b1 x_t; with g_t the gradient at y_t, "
         "v_t = b2 v + (1-b2) g^2, gamma_t = lr sqrt(1 - b2^t) (lr after the lr hook, so warmup enters "
         "here), z <- z - gamma_t (g / (sqrt(v) + eps) + wd y), x <- (1-c) x + c z with "
         "c = gamma_t^2 / sum_i gamma_i^2 (Algorithm 1, z_1 = x_1 = the initial weights). x is what is "
         "evaluated and returned (params, hashes; BatchNorm statistics recomputed for it), y what trains. "
         "The authors pair it with a warm-up and often a larger rate than a scheduled AdamW.",
    interactions="warmup allowed (it multiplies gamma_t); a decaying schedule or optim.lr_end is refused.",
    paper="Defazio et al. 2024, 'The Road Less Scheduled' (Schedule-Free AdamW, Algorithm 1)",
    oracle="Algorithm 1 written out in plain torch with warmup: same y (trained) and x (evaluated) after 6 steps"))


# -- 2024: ADOPT (registered by methods/optimizers_late.py, a family after every other one) -------
def adopt_update(w, g, st, lr, beta1=0.9, beta2=0.9999, eps=1e-6, clip=True, weight_decay=0.0):
    """ADOPT: the gradient is normalized by the second moment of the steps BEFORE it (so g_t and
    v_{t-1} are independent), clipped to +-t^(1/4), and only then averaged into the momentum.
    The first call only sets v_0 = g_0^2 and leaves w as it is."""
    t = st.get("step", 0)
    st["step"] = t + 1
    if t == 0:
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(w), g * g
        return
    m, v = st["exp_avg"], st["exp_avg_sq"]
    if weight_decay:
        w.mul_(1 - _col(lr, w) * weight_decay)
    normed = g / v.sqrt().clamp_(min=eps)                   # g_t / max(sqrt(v_{t-1}), eps)
    if clip:
        normed.clamp_(-t ** 0.25, t ** 0.25)
    m.lerp_(normed, 1 - beta1)
    _descend(w, m, lr)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)           # v_t, used by the next step


class ADOPT(_Optimizer):
    fn = staticmethod(adopt_update)
