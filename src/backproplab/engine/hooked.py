"""The hooked engine (train.engine=hooked): minibatches with the methods registry's hook points.

train() hands over a pass in chunks; the engine keeps them and trains the whole pass in
end_pass(), so batches are aligned to passes (the last one may be smaller), the pass
length n is known before the first step (schedules need T = passes * ceil(n / batch)),
and every random draw of pass p comes from generators keyed by (seed, p): the state at
a pass boundary (weights, optimizer moments, averages, statistics, step count) is all a
resumed run needs to continue bit for bit.

Per replica and pass, in the order methods/registry.HOOKS fixes (and, inside one hook,
in the methods' rank order):
  pass_start; then per batch: lr -> batch -> forward (autocast, model noise) -> loss ->
  backward -> after_backward (SAM, AGC) -> before_step (decoupled decay) -> step (the one
  optimizer) -> after_step (EMA); pass_end (SWA), then BatchNorm statistics recomputed
  for averaged weights. Evaluation runs the eval hooks (standardization, averaged weights).
Replicas (train.seeds) are trained one after another (correctness first, no vmap): each
has its own model, flat float32 weight vector the module parameters alias, and switches.
"""
import contextlib
import math

import numpy as np
import torch

from ..config import MethodSpec
from ..data.augment import shift_images
from ..errors import UserError
from ..methods.augment import pass_generator
from ..methods.registry import HOOKS, build_switch, get_method, resolve
from ..models.modnet import FINAL_PARAMS, ModNet
from ..models.registry import build_model, dropout_units
from .evaluate import metrics_from_outputs
from .minibatch import batch_loss

EVAL_CHUNK = 2048    # images per forward pass at evaluation and BatchNorm recomputation
NOISE_TAG = 1        # generator tag of the model's noise (data methods use 100 + rank)
# the hooks after the backward pass, in the registry's one written order:
# after_backward, before_step, step, after_step
AFTER_BACKWARD = HOOKS[HOOKS.index("after_backward"):HOOKS.index("after_step") + 1]
# switch attribute each hook calls
HOOK_ATTR = {"build": "build", "pass_start": "pass_start", "lr": "lr", "batch": "batch",
             "forward": "forward_context", "loss": "loss", "after_backward": "after_backward",
             "before_step": "before_step", "step": "step", "after_step": "after_step", "pass_end": "pass_end",
             "eval": ("eval_batch", "eval_weights")}


def run_specs(cfg) -> list:
    """cfg.methods plus the optimizer optim.name stands for when no optimizer method is given."""
    specs = list(cfg.methods)
    if not any(get_method(s.name).slot == "optimizer" for s in specs):
        o = cfg.optim
        opts = {"sgd": {}, "adamw": {"beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
                                     "weight_decay": o.weight_decay}, "sdlm": {"mu": o.mu, "gamma": o.gamma}}
        specs.append(resolve(MethodSpec(o.name, opts[o.name])))
    return sorted(specs, key=lambda s: get_method(s.name).rank)


class Ctx:
    """What a switch sees of one replica at a hook (attributes set by the engine)."""


class Replica:
    def __init__(self, cfg, seed, specs):
        self.cfg, self.seed = cfg, seed
        self.switches = [(s.name, build_switch(s, rank=get_method(s.name).rank, seed=seed)) for s in specs]
        m = cfg.model
        if m.name == "net1989":
            spec = {}
            for sw in self._hook("build"):
                sw.build(spec)
            self.model = ModNet(seed, act=m.act, out_act=m.out_act, dropout=m.dropout, **spec)
        else:
            self.model = build_model(m, seed)
        self.model.train()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        self.w = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()  # (P,) float32
        cols = np.cumsum([0] + [p.numel() for p in self.params])
        self.slices = [(n, a, b, p.shape) for n, a, b, p in zip(self.names, cols[:-1], cols[1:], self.params)]
        self.views = self._views(self.w)
        for n, p in zip(self.names, self.params):  # the module now trains the flat vector
            p.data = self.views[n]
        self.eval_buffers = None  # BatchNorm statistics recomputed for averaged weights
        c = self.ctx = Ctx()
        c.cfg, c.seed, c.model = cfg, seed, self.model
        c.w, c.views, c.params, c.param_names = self.w, self.views, self.params, self.names
        c.final_names = tuple(n for n in self.names if n in FINAL_PARAMS)
        c.base_lr, c.passes, c.closure = cfg.optim.lr, cfg.train.passes, self._closure
        opt = self._hook("step")
        assert len(opt) == 1, "exactly one optimizer"
        self.opt = opt[0]

    def _views(self, flat):
        return {n: flat[a:b].view(sh) for n, a, b, sh in self.slices}

    def _hook(self, hook, attr=None):
        attr = attr or HOOK_ATTR[hook]
        cache = self.__dict__.setdefault("_hooks", {})  # switches never change after construction
        if attr not in cache:
            cache[attr] = [sw for _, sw in self.switches if hasattr(sw, attr)]
        return cache[attr]

    @contextlib.contextmanager
    def _forward_ctx(self):
        with contextlib.ExitStack() as stack:
            for sw in self._hook("forward"):
                stack.enter_context(sw.forward_context())
            yield

    # -- one pass ---------------------------------------------------------------------------
    def train_pass(self, p, x_raw, x, labels, keep, lrs, batch, t0, T):
        c = self.ctx
        c.pass_idx, c.pass_x, c.total_steps = p, x_raw, T
        self.model.gen = pass_generator(self.seed, p, NOISE_TAG)
        for sw in self._hook("pass_start"):
            sw.pass_start(c)
        for k, a in enumerate(range(0, len(x), batch)):
            b = a + batch
            self._step(x[a:b], labels[a:b], None if keep is None else keep[a:b], float(lrs[a]), t0 + k)
        for sw in self._hook("pass_end"):
            sw.pass_end(c)
        self._recompute_eval_buffers(x_raw)
        c.pass_x = None

    def _step(self, x, labels, keep, lr, t):
        c = self.ctx
        c.step, c.lr = t, lr
        for sw in self._hook("lr"):
            c.lr = sw.lr(c)
        for sw in self._hook("batch"):
            x = sw.batch(x, c)
        c.x, c.labels, c.keep = x, labels, keep
        c.gen_state = self.model.gen.get_state()
        c.g = self._closure()
        c.gviews = self._views(c.g)
        for hook in AFTER_BACKWARD:
            for sw in self._hook(hook):
                getattr(sw, hook)(c)

    def _closure(self, second=False):
        """Forward, loss and backward on ctx's batch -> flat gradient (P,). second: SAM's pass at
        perturbed weights: the same noise, BatchNorm statistics not updated."""
        c, model = self.ctx, self.model
        if second:
            model.gen.set_state(c.gen_state)
            model.update_stats = False
        try:
            with self._forward_ctx():
                out = model(c.x, c.keep)
            value = batch_loss(out.float(), c.labels, self.cfg.train.loss)
            for sw in self._hook("loss"):
                value = sw.loss(c, out, c.labels, value)
            grads = torch.autograd.grad(value, self.params)
        finally:
            model.update_stats = True
        return torch.cat([g.reshape(-1) for g in grads])

    # -- evaluation -------------------------------------------------------------------------
    def eval_weights(self):
        for sw in self._hook("eval", "eval_weights"):
            avg = sw.eval_weights(self.ctx)
            if avg is not None:
                return avg
        return None

    def _eval_input(self, x):
        for sw in self._hook("eval", "eval_batch"):
            x = sw.eval_batch(x, self.ctx)
        return x

    @contextlib.contextmanager
    def _swapped(self, weights, buffers):
        """Temporarily run the model with other weights and BatchNorm buffers."""
        saved_w = self.w.clone()
        saved_b = {n: b.clone() for n, b in self.model.named_buffers() if n.endswith(("_rm", "_rv"))}
        with torch.no_grad():
            if weights is not None:
                self.w.copy_(weights)
            for n, v in (buffers or {}).items():
                getattr(self.model, n).copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                self.w.copy_(saved_w)
                for n, v in saved_b.items():
                    getattr(self.model, n).copy_(v)

    @torch.no_grad()
    def _recompute_eval_buffers(self, x_raw):
        """For averaged weights with BatchNorm: running statistics as the cumulative mean of the
        batch statistics over the training set (inputs standardized, no noise, no augmentation)."""
        avg = self.eval_weights()
        if avg is None or not getattr(self.model, "has_batchnorm", lambda: False)():
            return
        m = self.model
        with self._swapped(avg, None):
            for n, b in m.named_buffers():
                if n.endswith("_rm"):
                    b.zero_()
                elif n.endswith("_rv"):
                    b.fill_(1.0)
            gen, m.gen = m.gen, None
            x = self._eval_input(x_raw)
            with self._forward_ctx():
                for k, a in enumerate(range(0, len(x), EVAL_CHUNK)):
                    m.bn_momentum = 1.0 / (k + 1)
                    m(x[a:a + EVAL_CHUNK])
            m.bn_momentum, m.gen = 0.1, gen
            self.eval_buffers = {n: b.clone() for n, b in m.named_buffers() if n.endswith(("_rm", "_rv"))}

    @torch.no_grad()
    def outputs(self, x):
        m = self.model
        with self._swapped(self.eval_weights(), self.eval_buffers):
            m.eval()
            x = self._eval_input(x)
            with self._forward_ctx():
                out = torch.cat([m(x[a:a + EVAL_CHUNK]).float() for a in range(0, len(x), EVAL_CHUNK)])
            m.train()
        return out


class HookedPopulation:
    def __init__(self, cfg, seeds):
        if cfg.train.device != "cpu":
            raise UserError("train.engine=hooked runs on the CPU (train.device=cpu)")
        self.cfg, self.seeds, self.batch = cfg, list(seeds), int(cfg.train.batch)
        self.specs = run_specs(cfg)
        self.dropout_units = dropout_units(cfg.model)
        self.replicas = [Replica(cfg, s, self.specs) for s in self.seeds]
        self.t, self.passes_done, self.n = 0, 0, None
        self.chunks = []

    def methods(self) -> list:
        return [s.name for s in self.specs]

    def train_pass(self, x, labels, lr, shifts=None, keep=None):
        """Collects one chunk of the pass: x (k, 16, 16), labels (k,), lr (k,) per example,
        shifts (R, k, 2), keep (R, k, U). Training happens in end_pass()."""
        self.chunks.append((np.asarray(x, dtype=np.float32), np.asarray(labels), np.asarray(lr, dtype=np.float64),
                            None if shifts is None else np.asarray(shifts), None if keep is None else np.asarray(keep)))

    def end_pass(self):
        if not self.chunks:
            return
        cat = lambda i, ax=0: None if self.chunks[0][i] is None else np.concatenate(  # noqa: E731
            [ch[i] for ch in self.chunks], ax)
        x = torch.from_numpy(cat(0)).reshape(-1, 1, 16, 16)
        labels, lrs, shifts, keep = torch.from_numpy(cat(1)).long(), cat(2), cat(3, 1), cat(4, 1)
        self.chunks = []
        n = len(x)
        if self.n is None:
            self.n = n
        elif n != self.n:
            raise UserError(f"pass of {n} examples after passes of {self.n}: the schedule's length would change")
        steps = math.ceil(n / self.batch)
        T = self.cfg.train.passes * steps
        for r, rep in enumerate(self.replicas):
            xr = x if shifts is None else shift_images(x, shifts[r])
            kr = None if keep is None else torch.from_numpy(keep[r])
            rep.train_pass(self.passes_done, x, xr, labels, kr, lrs, self.batch, self.t, T)
        self.t += steps
        self.passes_done += 1

    def evaluate(self, x, labels, loss) -> list:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, 1, 16, 16)
        out = torch.stack([rep.outputs(x) for rep in self.replicas])  # (R, B, 10)
        return metrics_from_outputs(out, torch.as_tensor(np.asarray(labels)).long(), loss)

    def params(self) -> list:
        """Per replica {name: array}: the evaluated weights (the SWA/EMA average when there is one)."""
        out = []
        for rep in self.replicas:
            avg = rep.eval_weights()
            v = rep.views if avg is None else rep._views(avg)
            out.append({n: v[n].detach().numpy().copy() for n in rep.names})
        return out

    # -- state: everything a resumed run needs, at a pass boundary ---------------------------------
    def state(self) -> dict:
        if self.chunks:
            raise RuntimeError("state() inside a pass: call end_pass() first")
        st = {"t": np.asarray(self.t), "passes_done": np.asarray(self.passes_done),
              "n": np.asarray(-1 if self.n is None else self.n)}
        for r, rep in enumerate(self.replicas):
            st[f"{r}.w"] = rep.w.numpy().copy()
            for n, b in rep.model.named_buffers():
                if n.endswith(("_rm", "_rv")):
                    st[f"{r}.buf.{n}"] = b.numpy().copy()
            for n, b in (rep.eval_buffers or {}).items():
                st[f"{r}.evalbuf.{n}"] = b.numpy().copy()
            for name, sw in rep.switches:
                for k, v in (sw.state() if hasattr(sw, "state") else {}).items():
                    st[f"{r}.m.{name}.{k}"] = v.detach().numpy().copy() if torch.is_tensor(v) else np.asarray(v)
        return st

    def load_state(self, st: dict) -> None:
        if f"{len(self.replicas) - 1}.w" not in st or np.asarray(st["0.w"]).shape != self.replicas[0].w.shape:
            raise UserError("checkpoint does not fit this model and method list")
        self.t, self.passes_done = int(st["t"]), int(st["passes_done"])
        self.n = None if int(st["n"]) < 0 else int(st["n"])
        for r, rep in enumerate(self.replicas):
            with torch.no_grad():
                rep.w.copy_(torch.as_tensor(np.asarray(st[f"{r}.w"])))
                for n, b in rep.model.named_buffers():
                    if n.endswith(("_rm", "_rv")):
                        b.copy_(torch.as_tensor(np.asarray(st[f"{r}.buf.{n}"])))
            pre = f"{r}.evalbuf."
            ev = {k[len(pre):]: torch.as_tensor(np.asarray(v)).clone() for k, v in st.items() if k.startswith(pre)}
            rep.eval_buffers = ev or None
            for name, sw in rep.switches:
                pre = f"{r}.m.{name}."
                d = {k[len(pre):]: np.asarray(v) for k, v in st.items() if k.startswith(pre)}
                if hasattr(sw, "load_state"):
                    sw.load_state(d)

