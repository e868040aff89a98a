"""The population engine: every minibatch run, R replicas at once, the methods registry's hooks.

A population is R replicas that differ by seed (and, through `lrs`, by learning rate).
All their weights live in one (R, P) float32 buffer W; the optimizer, schedules,
gradient methods and averages are the registry's switches, each acting on the whole
population at once (ctx.w is W, ctx.g the (R, P) gradient, ctx.lr an (R, 1) column).

Three paths compute the gradient, the first in PATHS that can run the config chosen
automatically (`path`, stored with every run):
  kernel    engine/kernelgrad.py's numba kernels, per example forward and hand-derived backward
            of Net1989 summed over the batch (its activations, cross-entropy with label smoothing
            or MSE, and lwf's distillation term toward the frozen net's outputs): taken on an
            AVX-512 CPU when every active method runs on it (Method.runs_on, fused_reason) and
            the kernels compute its model change (`fast_model`): the dropout method's H2 masks,
            nf's standardized weights, spatial dropout's H1 plane factors and DropConnect's H3
            weight factors, all drawn here (_fast_noise) from each replica's noise stream in the
            order ModNet's forward draws them;
  fused     models/fused1989.py's hand-derived forward and backward of Net1989 (ReLU, logits,
            cross-entropy) as batched matrix products over the replica axis: taken when the
            model is that net and every active method runs on it (it needs no autograd and
            leaves the model's structure alone, or changes it in a way the path computes);
  autograd  ModNet (Net1989 with the model methods' switches): models/stacked.py's one forward
            for the whole population, the replicas as the groups of channels-last grouped
            convolutions, parameters as (R, ...) leaves on W's storage, so one backward gives
            the (R, P) gradient; each replica draws its noise from its own (seed, pass)
            generator and keeps its own BatchNorm statistics (rows of (R, C) buffers that the
            modules share). Per step 1.5-1.9x faster than the loop over R modules at R = 8,
            batch 32, one thread (benchmarks/bench_autograd.py; Population(..., _loop=True)
            keeps the loop). Replica k equals a solo run of seed k to float tolerance, not bit
            for bit: the grouped convolutions round differently for another R (a resumed run
            of the same R is bit for bit). Other models (ViT, convnets) loop over modules or
            run under torch.func.vmap.
Every path sees the same batches and masks; tests check that their gradients agree.
The kernel path also gives a switch declaring needs_curvature (sdlm) the batch mean of each
example's Gauss-Newton diagonal estimate as ctx.curvature, computed with the gradient at the
same weights.
Inputs are (1, r, r) images, r = data.resolution: 16 (every model), 20 or 28 (the convnet
family, whose modules take `resolution`; the fast paths are Net1989's, 16x16 only).

Per pass, in the order methods/registry.HOOKS fixes (and, inside one hook, rank order):
  pass_start; per batch: lr -> batch -> forward (autocast, model noise, the weights it sees: QAT) -> loss ->
  backward -> after_backward (SAM, AGC) -> before_step (decoupled decay) -> step (the one
  optimizer) -> after_step (EMA); pass_end (SWA), then BatchNorm statistics recomputed
  for averaged weights. Evaluation runs the eval hooks (standardization, averaged weights).
train() hands a pass over in chunks; the engine trains it at end_pass(), so batches are
aligned to passes (the last may be smaller) and T = passes * ceil(n / batch) is known
before the first step. Every random draw of pass p comes from generators keyed by
(seed, p): replica k of any population draws what a solo run of seed k draws, and the
state at a pass boundary is all a resumed run needs to continue bit for bit.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..config import MethodSpec
from ..data.augment import shift_stack
from ..errors import UserError
from ..methods.augment import pass_generator
from ..methods.registry import HOOKS, build_switch, get_method, resolve
from ..models import fused1989 as fz
from ..models.modnet import FINAL_PARAMS, ModNet, dropout_mask, scaled_ws_rows, ws_names
from ..models.noise import fill_keep
from ..models.stacked import StackedModNet
from ..models.registry import build_model, dropout_units
from .evaluate import metrics_from_outputs

EVAL_CHUNK = 2048    # images per forward pass at evaluation and BatchNorm recomputation
NOISE_TAG = 1        # generator tag of the model's noise (data methods use 100 + rank)
AFTER_BACKWARD = HOOKS[HOOKS.index("after_backward"):HOOKS.index("after_step") + 1]
HOOK_ATTR = {"build": "build", "pass_start": "pass_start", "lr": "lr", "batch": "batch",
             "forward": ("forward_context", "forward_weights"), "loss": ("criterion", "loss"), "after_backward": "after_backward",
             "before_step": "before_step", "step": "step", "after_step": "after_step", "pass_end": "pass_end",
             "eval": ("eval_batch", "eval_weights", "eval_outputs")}
PATHS = ("kernel", "fused", "autograd")   # fastest first: the automatic choice is the first that can run
# The autograd path runs the registry's other models (ViT, the convnet family: no per-replica
# noise generators or BatchNorm buffers) under torch.func.vmap from this many replicas: their
# small matrix products batch well (the ViT at R = 8: half the loop's time per replica, this
# repo's benchmark). ModNet has its stacked forward: see the module docstring.
VMAP_FROM = 2


def batch_loss(out: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """out (..., B, 10), labels (B,) or (R, B) (each replica its own) -> (...) mean over the batch
    of the per-example loss."""
    if loss == "mse":  # mean over the 10 outputs against -1 / +1 targets
        target = 2.0 * F.one_hot(labels, 10).to(out.dtype) - 1.0
        return torch.mean((out - target) ** 2, dim=(-2, -1))
    per = F.cross_entropy(out.reshape(-1, 10), labels.expand(out.shape[:-1]).reshape(-1), reduction="none")
    return per.reshape(out.shape[:-1]).mean(-1)


def run_specs(cfg) -> list:
    """cfg.methods plus the optimizer optim.name stands for when no optimizer method is given."""
    specs = list(cfg.methods)
    if not any(get_method(s.name).slot == "optimizer" for s in specs):
        o = cfg.optim
        opts = {"sgd": {}, "adamw": {"beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
                                     "weight_decay": o.weight_decay}, "sdlm": {"mu": o.mu, "gamma": o.gamma}}
        specs.append(resolve(MethodSpec(o.name, opts[o.name])))
    return sorted(specs, key=lambda s: get_method(s.name).rank)


def fused_reason(cfg, specs, path="fused") -> str | None:
    """Why the `path` ('kernel' or 'fused') cannot run this config, or None when it can."""
    m, t = cfg.model, cfg.train
    if m.name != "net1989":
        return "the fast paths are Net1989's"
    if t.device != "cpu":
        return "the fast paths run on the CPU"
    slow = [s.name for s in specs if not get_method(s.name).fast]
    if slow:
        return f"{', '.join(slow)} need autograd or change the model"
    other = [get_method(s.name) for s in specs if not get_method(s.name).runs_on(path)]
    model = [o.name for o in other if o.modnet]
    if model:
        return f"the {path} path does not compute the model change of {', '.join(model)}"
    if other:  # a loss term only some fast paths add (lwf: the kernels)
        return (f"the {path} path does not compute {', '.join(o.name for o in other)} (only the "
                f"{' and '.join(sorted({p for o in other for p in o.fast_on}))} path does)")
    if path == "kernel":
        from .kernelgrad import kernel_reason
        return kernel_reason(cfg)
    if m.act != "relu" or m.out_act != "none" or t.loss != "ce":
        return "the fused products are Net1989 with ReLU, logits and cross-entropy"
    return None


class Ctx:
    """What a switch sees of the population at a hook (attributes set by the engine).
    gviews, the per-parameter views of the gradient g, is built when a switch first asks.
    curvature: (R, P), the batch mean of sdlm's per-example Gauss-Newton diagonal estimate at
    the weights of the step, when the kernels computed it with the gradient (a switch declaring
    needs_curvature, on the kernel path); else None (the switch computes it itself)."""
    _gv = None
    curvature = None

    @property
    def gviews(self):
        if self._gv is None:
            self._gv = self.views_of(self.g)
        return self._gv


class Population:
    def __init__(self, cfg, seeds, lrs=None, path="auto", vmap=None, _loop=False):
        """lrs: one peak rate per replica (default optim.lr for all); path: auto or one of PATHS;
        vmap: run the autograd path's forward under torch.func.vmap (default: from VMAP_FROM
        replicas on, for models other than net1989). _loop: ModNet's autograd path as the loop
        over the R modules instead of the stacked forward (benchmarks/bench_autograd.py)."""
        if cfg.train.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available on this machine")
        self.cfg, self.seeds, self.batch, self.R = cfg, [int(s) for s in seeds], int(cfg.train.batch), len(seeds)
        self.device = torch.device(cfg.train.device)
        self.specs = run_specs(cfg)
        self.side = int(cfg.data.resolution)  # the input side (data.resolution: convnets take 20 and 28 too)
        self.dropout_units = dropout_units(cfg.model, self.side)
        self.switches = [(s.name, build_switch(s, rank=get_method(s.name).rank, seeds=self.seeds))
                         for s in self.specs]
        if path == "auto":
            path = next(p for p in PATHS if p == "autograd" or fused_reason(cfg, self.specs, p) is None)
        if path not in PATHS:
            raise ValueError(f"path must be auto or one of {', '.join(PATHS)}")
        why = None if path == "autograd" else fused_reason(cfg, self.specs, path)
        if why:
            raise UserError(f"the {path} path cannot run this run: {why}")
        self.path = path
        # what the switches need of the engine, fixed at construction (switches never change):
        # the label smoothing the fast paths build into their cross-entropy; whether ctx.x must hold
        # each replica's batch as its model sees it (a data method transforms it, or a switch reads
        # it; else the kernels shift shared images themselves); whether a switch replays the batch
        # (SAM's second gradient: the same model noise again)
        self.smooth = sum(getattr(sw, "fused_smooth", 0.0) for sw in self._hook("loss", "criterion"))
        self.inputs_per_replica = bool(self._hook("batch")) or any(
            getattr(sw, "needs_inputs", False) for _, sw in self.switches)
        self.replays = any(getattr(sw, "replays_batch", False) for _, sw in self.switches)
        # a distillation term the kernels add to the cross-entropy's logit gradient (lwf's kernel_soft:
        # the frozen net's probabilities on each replica's batch; it declares needs_inputs, so every
        # replica runs on the solo kernel, the one that adds it)
        self.soft = self._hook("loss", "kernel_soft")
        assert len(self.soft) <= 1, "one distillation term on the kernels"
        self.models = [self._build_model(s) for s in self.seeds]
        # the model changes the fast paths compute themselves (methods declaring fast_model): the
        # dropout method's H2-output masks, drawn here from each replica's noise generator as the
        # stacked forward draws them, and nf's scaled weight standardization, applied to W before
        # the kernels and differentiated by autograd on the weights alone (a few thousand numbers)
        m0, fast = self.models[0], path != "autograd"
        self.noise_drop = float(getattr(m0, "drop", 0.0)) if fast else 0.0
        # and on the kernels, spatial dropout's H1 plane factors and DropConnect's H3 weight factors
        self.noise_spatial = float(getattr(m0, "spatial", 0.0)) if path == "kernel" else 0.0
        self.noise_dc = float(getattr(m0, "dropconnect", 0.0)) if path == "kernel" else 0.0
        self.keep_p = cfg.model.dropout or self.noise_drop   # the rate the keep masks scale by
        self.ws = ws_names(n for n, _ in m0.named_parameters()) if fast and getattr(m0, "ws", False) else []
        self.kernel = None
        if path == "kernel":
            from .kernelgrad import KernelGrad
            m = cfg.model
            self.kernel = KernelGrad(self.R, m.act, m.out_act, cfg.train.loss, self.keep_p,
                                     per_replica_inputs=self.inputs_per_replica, smooth=self.smooth,
                                     solo=bool(self.noise_spatial or self.noise_dc))
        # the kernels' curvature sums (ctx.curvature) for a switch that reads them: on the solo kernel
        # (per-replica inputs), and only where they are the estimate at the weights the step changes
        # (no forward_weights or before_step method moves W between the gradient and the step, no
        # weight standardization; SAM's second gradient, at perturbed weights, does not replace them)
        self.curvature = (self.kernel is not None and self.inputs_per_replica and not self.ws
                          and any(getattr(sw, "needs_curvature", False) for _, sw in self.switches)
                          and not self._hook("forward", "forward_weights") and not self._hook("before_step"))
        self.names = [n for n, _ in self.models[0].named_parameters()]
        shapes = [p.shape for _, p in self.models[0].named_parameters()]
        cols = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
        self.slices = list(zip(self.names, cols[:-1], cols[1:], shapes))
        self.W = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()])
                              for m in self.models]).to(self.device)                  # (R, P)
        self.views = self._views(self.W)
        for r, mod in enumerate(self.models):  # each module now trains its row of W
            mod.to(self.device)
            for n, p in mod.named_parameters():
                p.data = self.views[n][r]
        # ModNet on the autograd path: one stacked forward for the population (models/stacked.py);
        # each module's BatchNorm buffers become rows of its (R, C) buffers
        self.stack = None
        if cfg.model.name == "net1989" and path == "autograd" and not _loop:
            self.stack = StackedModNet(self.models[0], self.R).to(self.device)
            for r, mod in enumerate(self.models):
                for n in self.stack.bufs:
                    self.stack.bufs[n][r].copy_(mod._buffers[n])
                    mod._buffers[n] = self.stack.bufs[n][r]
        self.eval_buffers = None  # per replica: BatchNorm statistics recomputed for averaged weights
        if vmap is None:  # not with BatchNorm: its running statistics are each module's (models/deep.py)
            vmap = cfg.model.name != "net1989" and self.R >= VMAP_FROM and not self._bn_buffers(0)
        self.vmapped = bool(vmap) and path == "autograd" and cfg.model.name != "net1989"
        if self.vmapped:  # vmap of the forward only: autograd then runs on the batched ops
            fwd = lambda prm, xb, kb: functional_call(self.models[0], prm, (xb, kb))  # noqa: E731
            self._vfwd = {True: torch.func.vmap(fwd, in_dims=(0, 0, 0)),
                          False: torch.func.vmap(fwd, in_dims=(0, 0, None))}
        lrs = [cfg.optim.lr] * self.R if lrs is None else [float(v) for v in lrs]
        if len(lrs) != self.R:
            raise ValueError(f"{len(lrs)} learning rates for {self.R} replicas")
        c = self.ctx = Ctx()
        c.cfg, c.seeds, c.R, c.models = cfg, self.seeds, self.R, self.models
        c.w, c.views, c.param_names, c.views_of = self.W, self.views, self.names, self._views
        c.params = [list(m.parameters()) for m in self.models]  # per replica, aliasing W's rows
        c.final_names = tuple(n for n in self.names if n in FINAL_PARAMS)
        # one rate for all replicas: a float, as torch.optim has it; else an (R, 1) column
        self.uniform_lr = len(set(lrs)) == 1
        c.base_lr = lrs[0] if self.uniform_lr else torch.tensor(lrs, dtype=torch.float64).view(-1, 1)
        c.base_lrs, c.passes, c.closure = lrs, cfg.train.passes, self._closure
        opt = self._hook("step")
        assert len(opt) == 1, "exactly one optimizer"
        self.t, self.passes_done, self.n, self.chunks = 0, 0, None, []
        self._batch_pass = None   # train_batch(): the epoch whose pass_start hooks ran last

    def _build_model(self, seed):
        m = self.cfg.model
        if m.name != "net1989":
            model = build_model(m, seed, self.side)
        else:
            spec = {}
            for sw in self._hook("build"):
                sw.build(spec)
            model = ModNet(seed, act=m.act, out_act=m.out_act, dropout=m.dropout, **spec)
        return model.train()

    def _views(self, flat):  # (R, P) -> name: (R, *shape)
        return {n: flat[:, a:b].view(flat.shape[0], *sh) for n, a, b, sh in self.slices}

    def _hook(self, hook, attr=None):
        attr = attr or HOOK_ATTR[hook]
        cache = self.__dict__.setdefault("_hooks", {})  # switches never change after construction
        if attr not in cache:
            cache[attr] = [sw for _, sw in self.switches if hasattr(sw, attr)]
        return cache[attr]

    @contextlib.contextmanager
    def _forward_ctx(self):
        with contextlib.ExitStack() as stack:
            for sw in self._hook("forward", "forward_context"):
                stack.enter_context(sw.forward_context())
            yield

    def methods(self) -> list:
        return [s.name for s in self.specs]

    # -- training -------------------------------------------------------------------------
    def train_pass(self, x, labels, lr=None, shifts=None, keep=None):
        """Collects one chunk of the pass: x (k, r, r) (r = data.resolution), labels (k,), shifts (R, k, 2), keep
        (R, k, U). lr is unused: the schedule is the lr hook's. Training happens in end_pass()."""
        self.chunks.append((np.asarray(x, dtype=np.float32), np.asarray(labels),
                            None if shifts is None else np.asarray(shifts), None if keep is None else np.asarray(keep)))

    def end_pass(self):
        if not self.chunks:
            return
        def cat(i, ax=0):  # a pass handed over in one chunk is used as it is (copying it cost ~0.1 s)
            if self.chunks[0][i] is None:
                return None
            if len(self.chunks) == 1 and self.chunks[0][i].flags.writeable:
                return self.chunks[0][i]
            return np.concatenate([ch[i] for ch in self.chunks], ax)
        x = torch.from_numpy(cat(0))
        if x.shape[1:] not in ((self.side, self.side), (1, self.side, self.side)):
            raise UserError(f"training images of {tuple(x.shape[1:])} pixels for data.resolution={self.side}")
        x = x.reshape(-1, 1, self.side, self.side)
        labels, shifts, keep = torch.from_numpy(cat(1)).long(), cat(2, 1), cat(3, 1)
        self.chunks = []
        n = len(x)
        if self.n is None:
            self.n = n
        elif n != self.n:
            raise UserError(f"pass of {n} examples after passes of {self.n}: the schedule's length would change")
        if keep is not None and keep.shape != (self.R, n, self.dropout_units):
            raise ValueError(f"keep masks {tuple(keep.shape)}, expected {(self.R, n, self.dropout_units)}")
        if keep is None and self.cfg.model.dropout > 0:
            raise ValueError("dropout needs the caller's keep masks (train() draws them from the pass stream)")
        kernel_shifts = None
        if self.kernel is not None and not self.inputs_per_replica:
            xs = x.unsqueeze(0).expand(self.R, -1, -1, -1, -1)  # the kernels shift each replica's copy themselves
            kernel_shifts = None if shifts is None else shifts.astype(np.int8)
        else:
            xs = (shift_stack(x, shifts) if shifts is not None
                  else x.unsqueeze(0).expand(self.R, -1, -1, -1, -1))              # (R, n, 1, r, r)
        keep = None if keep is None else torch.from_numpy(keep)
        self._train_pass(x, xs.to(self.device), labels.to(self.device),
                         None if keep is None else keep.to(self.device), kernel_shifts)
        self.passes_done += 1

    def train_batch(self, x, labels, total_steps, pass_idx=0, pass_x=None):
        """One step on a batch the caller chose (a scaling cell's epoch sampler): x (B, 1, r, r)
        shared by every replica and labels (B,), or x (R, B, 1, r, r) and labels (R, B), each
        replica its own batch (of the same size B; autograd and fused paths); total_steps the
        run's length (the schedules'), pass_idx the epoch the batch belongs to (it keys the random
        streams; the pass_start hooks run when it changes), pass_x the whole training set (input
        statistics). No train.shift or model.dropout masks: those come with train()'s passes.
        -> (R,) the batch's loss at the weights before the step (None on the kernel path)."""
        c = self.ctx
        if self.cfg.train.shift or self.cfg.model.dropout:
            raise UserError("train.shift and model.dropout need train()'s passes, not train_batch()")
        labels = torch.as_tensor(labels).long()
        if labels.dim() == 2:  # per-replica batches
            x = torch.as_tensor(x, dtype=torch.float32)
            if labels.shape[0] != self.R or x.shape[:2] != labels.shape:
                raise ValueError(f"per-replica batches: x {tuple(x.shape)}, labels {tuple(labels.shape)} "
                                 f"for {self.R} replicas")
            if self.path == "kernel":
                raise UserError("per-replica batches run on the autograd or fused path, not the kernels")
        if self._batch_pass != pass_idx:
            self._batch_pass = c.pass_idx = self.passes_done = pass_idx
            c.pass_x = pass_x if pass_x is not None else x
            for mod, s in zip(self.models, self.seeds):
                mod.gen = pass_generator(s, pass_idx, NOISE_TAG)
            for sw in self._hook("pass_start"):
                sw.pass_start(c)
        c.total_steps, c.shifts = int(total_steps), None
        if labels.dim() == 2:
            xs = x.reshape(self.R, -1, 1, self.side, self.side)
        else:
            xs = torch.as_tensor(x, dtype=torch.float32).reshape(1, -1, 1, self.side, self.side).expand(
                self.R, -1, -1, -1, -1)
        return self._step(xs.to(self.device), labels.to(self.device), None, c.base_lr)

    def _train_pass(self, x_raw, xs, labels, keep, kernel_shifts=None):
        c, n = self.ctx, len(labels)
        steps = math.ceil(n / self.batch)
        c.pass_idx, c.pass_x, c.total_steps = self.passes_done, x_raw, self.cfg.train.passes * steps
        for mod, s in zip(self.models, self.seeds):
            mod.gen = pass_generator(s, self.passes_done, NOISE_TAG)
        for sw in self._hook("pass_start"):
            sw.pass_start(c)
        for a in range(0, n, self.batch):
            b = a + self.batch
            c.shifts = None if kernel_shifts is None else kernel_shifts[:, a:b]  # (R, B, 2) for the kernels
            self._step(xs[:, a:b], labels[a:b], None if keep is None else keep[:, a:b], self._run_lr(a, n))
        for sw in self._hook("pass_end"):
            sw.pass_end(c)
        self._recompute_eval_buffers(x_raw)
        c.pass_x = None

    def _run_lr(self, a, n):
        """(R, 1) rate before the lr hook: optim.lr, or its linear decay to optim.lr_end over the run,
        per example as the per-example engines have it (a batch takes its first example's rate,
        rounded to float32 like engine/train.step_lrs)."""
        end = self.cfg.optim.lr_end
        if end is None:
            return self.ctx.base_lr
        frac = (self.passes_done * n + a) / max(self.cfg.train.passes * n - 1, 1)
        lr = self.ctx.base_lr + (end - self.ctx.base_lr) * frac
        return float(np.float32(lr)) if self.uniform_lr else lr.float().double()

    def _step(self, x, labels, keep, lr):  # x (R, B, 1, r, r), labels (B,), keep (R, B, U) bool, lr float or (R, 1)
        c = self.ctx
        c.step, c.lr = self.t, lr
        for sw in self._hook("lr"):
            c.lr = sw.lr(c)
        if torch.is_tensor(c.lr):
            c.lr = c.lr.to(torch.float32).expand(self.R, 1)  # (R, 1)
        for sw in self._hook("batch"):
            x = sw.batch(x, c)
        c.maps = c.dcm = None
        if self.noise_drop or self.noise_spatial or self.noise_dc:
            keep, c.maps, c.dcm = self._fast_noise(labels.shape[-1], keep)
        c.x, c.labels, c.keep = x, labels, keep
        if self.replays and self.path == "autograd":  # the model noise of this batch, for the replay
            c.gen_states = [m.gen.get_state() for m in self.models]
        c.g, c._gv = self._closure(), None
        loss = c.loss   # the batch's loss at the weights before the step (SAM's second closure overwrites c.loss)
        for hook in AFTER_BACKWARD:
            for sw in self._hook(hook):
                getattr(sw, hook)(c)
        self.t += 1
        return loss

    def _fast_noise(self, B, keep):
        """The model methods' masks for the fast paths, drawn from each replica's noise stream in the
        order and shapes ModNet's forward draws them (spatial dropout's planes, the dropout method's
        H2 outputs, DropConnect's H3 weights): -> keep (R, B, 192) bool (the dropout method's, else
        the caller's), maps (R, B, 12) and dcm (R, B, 5760) float32 factors (0 or 1/(1-p)) or None.
        Drawn once a step: SAM's second gradient sees the same masks."""
        maps, drop = [], []
        dcm = np.empty((self.R, B * 30 * 192), np.float32) if self.noise_dc else None  # the kernels' input as it is
        for r, m in enumerate(self.models):
            if self.noise_spatial:
                maps.append(dropout_mask((B, 12), self.noise_spatial, m.gen))
            if self.noise_drop:
                drop.append(dropout_mask((B, 192), self.noise_drop, m.gen) > 0)
            if self.noise_dc:
                fill_keep(dcm[r], self.noise_dc, m.gen)
        if drop:
            keep = torch.stack(drop).to(self.device)
        return keep, torch.stack(maps) if maps else None, None if dcm is None else torch.from_numpy(dcm)

    def _closure(self, second=False):
        """Forward, loss and backward on ctx's batch -> (R, P) gradient. second: SAM's pass at
        perturbed weights: the same noise, BatchNorm statistics not updated. A forward_weights
        method (QAT's fake quantization) gives the (R, P) weights the forward pass sees, or None;
        W holds them during the forward and backward and is restored after, so the gradient taken
        there is applied to W's own values (the straight-through estimator), on every path."""
        saved = None
        for sw in self._hook("forward", "forward_weights"):
            w = sw.forward_weights(self.ctx)   # reads ctx.w: the weights the previous one left
            if w is not None:
                if saved is None:
                    saved = self.W.clone()
                with torch.no_grad():
                    self.W.copy_(w)
        if saved is None:
            return self._gradient(second)
        try:
            return self._gradient(second)
        finally:
            with torch.no_grad():
                self.W.copy_(saved)

    def _gradient(self, second):
        c = self.ctx
        c.loss = None  # (R,) the batch's loss, detached: set by every path but the kernels'
        if not second:
            c.curvature = None
        if self.path in ("kernel", "fused"):
            g = self._ws_grad(c) if self.ws else self._fast_grad(c, self.W, self.curvature and not second)
            for sw in self._hook("loss", "penalty_grad"):  # a penalty's own gradient (the kernels' is the data term's)
                g += sw.penalty_grad(self.W)
            return g
        if second:
            for m, st in zip(self.models, c.gen_states):
                m.gen.set_state(st)
        if self.vmapped:
            return self._vmap_grad(c)
        if self.stack is not None:
            return self._stacked_grad(c, second)
        for m in self.models:
            m.update_stats = not second
        try:
            with self._forward_ctx():
                out = torch.stack([m(c.x[r], None if c.keep is None else c.keep[r])
                                   for r, m in enumerate(self.models)])             # (R, B, 10)
            value = self._loss(c, out)                                              # (R,)
            c.loss = value.detach()
            flat_params = [p for ps in c.params for p in ps]
            grads = torch.autograd.grad(value.sum(), flat_params)  # replicas share nothing: row r = dL_r/dW_r
        finally:
            for m in self.models:
                m.update_stats = True
        k = len(self.names)
        return torch.stack([torch.cat([g.reshape(-1) for g in grads[r * k:(r + 1) * k]]) for r in range(self.R)])

    def _loss(self, c, out):
        """(R,) per-replica loss: the criterion (a method's, e.g. label smoothing, or train.loss), then
        the loss terms of the methods in rank order (penalties add to whichever criterion ran)."""
        crit = self._hook("loss", "criterion")
        value = crit[0].criterion(out.float(), c.labels) if crit else batch_loss(out.float(), c.labels,
                                                                                  self.cfg.train.loss)
        for sw in self._hook("loss", "loss"):
            value = sw.loss(c, out, c.labels, value)
        return value

    def _vmap_grad(self, c):
        return self._leaf_grad(c, lambda leaves: self._vfwd[c.keep is not None](leaves, c.x, c.keep))

    def _stacked_grad(self, c, second):
        """ModNet's population in one forward (models/stacked.py)."""
        return self._leaf_grad(c, lambda leaves: self.stack(leaves, c.x, c.keep, [m.gen for m in self.models],
                                                            update_stats=not second))

    def _leaf_grad(self, c, forward):
        """forward(leaves) -> (R, B, 10) for the whole population: leaves (R, ...) share W's storage,
        so their gradients are the (R, P) gradient's pieces; ctx.params are the leaves' rows meanwhile."""
        leaves = {n: v.detach().requires_grad_() for n, v in self.views.items()}
        params, c.params = c.params, [[leaves[n][r] for n in self.names] for r in range(self.R)]
        try:
            with self._forward_ctx():
                out = forward(leaves)
            value = self._loss(c, out)
            c.loss = value.detach()
            grads = torch.autograd.grad(value.sum(), list(leaves.values()))
        finally:
            c.params = params
        return torch.cat([g.reshape(self.R, -1) for g in grads], 1)

    def _fast_grad(self, c, W, curvature=False):
        return self._kernel_grad(c, W, curvature) if self.path == "kernel" else self._fused_grad(c, W)

    def _kernel_grad(self, c, W, curvature=False):
        """The kernels' batch-mean gradient; curvature (per-replica inputs): ctx.curvature too."""
        keep = None if c.keep is None else c.keep.cpu().numpy()
        noise = {"maps": None if c.maps is None else c.maps.numpy(), "dcm": None if c.dcm is None else c.dcm.numpy(),
                 "soft": self.soft[0].kernel_soft(c, self._replica_outputs) if self.soft else None}
        if self.inputs_per_replica:  # each replica's batch as its model sees it (curvature needs it)
            out = self.kernel.grad(W, c.x.reshape(self.R, -1, 16, 16), c.labels, None, keep,
                                   curvature=curvature, **noise)
        else:
            out = self.kernel.grad(W, c.x[0].reshape(-1, 16, 16), c.labels, c.shifts, keep, **noise)
        if curvature:
            out, c.curvature = out
        return out

    def _replica_outputs(self, W, x):
        """W (R, P), x (R, B, 1, 16, 16) -> (R, B, 10): replica r's eval-mode outputs (no dropout)
        with weights W[r] on its batch x[r], by the evaluation kernel; the model the kernel path
        computes (nf: the standardized weights). One call when the replicas share the batch."""
        W = self._standardized(W)
        if x.stride(0) == 0:
            return self.kernel.outputs(W, x[0])
        return torch.cat([self.kernel.outputs(W[r:r + 1], x[r]) for r in range(self.R)])

    def _fused_grad(self, c, W):
        keep = None
        if c.keep is not None:
            keep = c.keep.to(torch.float32) * (1.0 / (1.0 - self.keep_p))
        labels = c.labels.expand(self.R, -1)   # (B,) shared or (R, B) per replica
        c.loss, g = fz.loss_and_grad(W, fz.prep(c.x), labels, keep, self.smooth)
        return g

    def _standardized(self, W):
        """(R, P) -> the weights ModNet's forward uses: W itself, or with nf (ws) its standardized
        weights (models/modnet.scaled_ws_rows, the function the stacked forward uses)."""
        if not self.ws:
            return W
        v = self._views(W)
        gain = self.models[0].gain
        return torch.cat([(scaled_ws_rows(v[n], gain) if n in self.ws else v[n]).reshape(self.R, -1)
                          for n in self.names], 1)

    def _ws_grad(self, c):
        """The fast paths' gradient at the standardized weights, carried back to W by autograd."""
        leaf = self.W.detach().requires_grad_()
        std = self._standardized(leaf)
        g = self._fast_grad(c, std.detach())
        return torch.autograd.grad(std, leaf, g)[0]

    # -- evaluation -------------------------------------------------------------------------
    def eval_weights(self):
        """(R, P) averaged weights when an averaging method has them, else None."""
        for sw in self._hook("eval", "eval_weights"):
            avg = sw.eval_weights(self.ctx)
            if avg is not None:
                return avg
        return None

    def _eval_input(self, x):
        for sw in self._hook("eval", "eval_batch"):
            x = sw.eval_batch(x, self.ctx)
        return x

    def _bn_buffers(self, r):  # ModNet's _rm/_rv; torch's BatchNorm (models/deep.py) in a state too
        return {n: b for n, b in self.models[r].named_buffers()
                if n.endswith(("_rm", "_rv", "running_mean", "running_var", "num_batches_tracked"))}

    @contextlib.contextmanager
    def _swapped(self, weights, buffers):
        """Temporarily run the models with other (R, P) weights and per-replica BatchNorm buffers."""
        saved_w = self.W.clone()
        saved_b = [{n: b.clone() for n, b in self._bn_buffers(r).items()} for r in range(self.R)]
        with torch.no_grad():
            if weights is not None:
                self.W.copy_(weights)
            for r, bufs in enumerate(buffers or []):
                for n, v in bufs.items():
                    self.models[r].get_buffer(n).copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                self.W.copy_(saved_w)
                for r, bufs in enumerate(saved_b):
                    for n, v in bufs.items():
                        self.models[r].get_buffer(n).copy_(v)

    @torch.no_grad()
    def _recompute_eval_buffers(self, x_raw):
        """For averaged weights with BatchNorm: running statistics as the cumulative mean of the
        batch statistics over the training set (inputs standardized, no noise, no augmentation)."""
        avg = self.eval_weights()
        if avg is None or not getattr(self.models[0], "has_batchnorm", lambda: False)():
            return
        x = self._eval_input(x_raw.to(self.device))
        with self._swapped(avg, None):
            if self.stack is not None:  # every replica at once: its k-th chunk at momentum 1 / (k + 1)
                for n, b in self.stack.bufs.items():
                    b.zero_() if n.endswith("_rm") else b.fill_(1.0)
                with self._forward_ctx():
                    for k, a in enumerate(range(0, len(x), EVAL_CHUNK)):
                        self.stack(self.views, x[a:a + EVAL_CHUNK], momentum=1.0 / (k + 1))
            for r, m in enumerate(self.models if self.stack is None else []):
                for n, b in self._bn_buffers(r).items():
                    b.zero_() if n.endswith("_rm") else b.fill_(1.0)
                gen, m.gen = m.gen, None
                with self._forward_ctx():
                    for k, a in enumerate(range(0, len(x), EVAL_CHUNK)):
                        m.bn_momentum = 1.0 / (k + 1)
                        m(x[a:a + EVAL_CHUNK])
                m.bn_momentum, m.gen = 0.1, gen
            self.eval_buffers = [{n: b.clone() for n, b in self._bn_buffers(r).items()} for r in range(self.R)]

    @torch.no_grad()
    def outputs(self, x) -> torch.Tensor:
        """x (B, 1, r, r) -> (R, B, 10) in eval mode, with the evaluated weights; an eval_outputs
        method (test-time shifts) decides which inputs are presented and how outputs combine."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() > 1 and x.shape[-1] not in (self.side, self.side * self.side):
            raise UserError(f"images of {tuple(x.shape[1:])} pixels for data.resolution={self.side}")
        x = x.reshape(-1, 1, self.side, self.side).to(self.device)
        avg = self.eval_weights()
        with self._swapped(avg, self.eval_buffers):
            for m in self.models:
                m.eval()
            try:
                combine = self._hook("eval", "eval_outputs")
                if combine:
                    return combine[0].eval_outputs(self._raw_outputs, x, self.ctx).cpu()
                return self._raw_outputs(x).cpu()
            finally:
                for m in self.models:
                    m.train()

    def _raw_outputs(self, x):
        x = self._eval_input(x)
        if self.path == "kernel":  # the evaluation kernel: every replica and image in one call
            return self.kernel.outputs(self._standardized(self.W), x)
        if self.path == "fused":
            W = self._standardized(self.W)
            return torch.cat([fz.logits(W, fz.prep(x[a:a + EVAL_CHUNK]))
                              for a in range(0, len(x), EVAL_CHUNK)], 1)
        # the modules one after another, not the stacked forward: at evaluation's large batches the
        # grouped convolutions cost 2.5-3x the loop (batchnorm, resblocks; R = 8, this machine); the
        # modules alias W's rows and the stack's BatchNorm buffers, so they evaluate the same weights
        with self._forward_ctx():
            return torch.stack([torch.cat([m(x[a:a + EVAL_CHUNK]).float() for a in range(0, len(x), EVAL_CHUNK)])
                                for m in self.models])

    def evaluate(self, x, labels, loss) -> list:
        return metrics_from_outputs(self.outputs(np.asarray(x)), torch.as_tensor(np.asarray(labels)).long(), loss)

    def params(self) -> list:
        """Per replica {name: array}: the evaluated weights (the SWA/EMA average when there is one)."""
        avg = self.eval_weights()
        v = self.views if avg is None else self._views(avg)
        return [{n: v[n][r].detach().cpu().numpy().copy() for n in self.names} for r in range(self.R)]

    # -- state: everything a resumed run needs, at a pass boundary ---------------------------------
    def state(self) -> dict:
        if self.chunks:
            raise RuntimeError("state() inside a pass: call end_pass() first")
        st = {"t": np.asarray(self.t), "passes_done": np.asarray(self.passes_done),
              "n": np.asarray(-1 if self.n is None else self.n), "W": self.W.cpu().numpy().copy()}
        for r in range(self.R):
            for n, b in self._bn_buffers(r).items():
                st[f"{r}.buf.{n}"] = b.cpu().numpy().copy()
            for n, b in (self.eval_buffers[r] if self.eval_buffers else {}).items():
                st[f"{r}.evalbuf.{n}"] = b.cpu().numpy().copy()
        for name, sw in self.switches:
            for k, v in (sw.state() if hasattr(sw, "state") else {}).items():
                st[f"m.{name}.{k}"] = v.detach().cpu().numpy().copy() if torch.is_tensor(v) else np.asarray(v)
        return st

    def load_state(self, st: dict) -> None:
        if "W" not in st or np.asarray(st["W"]).shape != tuple(self.W.shape):
            raise UserError("checkpoint does not fit this model, population and method list")
        self.t, self.passes_done = int(st["t"]), int(st["passes_done"])
        self.n = None if int(st["n"]) < 0 else int(st["n"])
        with torch.no_grad():
            self.W.copy_(torch.as_tensor(np.asarray(st["W"])))
            for r in range(self.R):
                for n, b in self._bn_buffers(r).items():
                    b.copy_(torch.as_tensor(np.asarray(st[f"{r}.buf.{n}"])))
        ev = [{k[len(f"{r}.evalbuf."):]: torch.as_tensor(np.asarray(v)).clone() for k, v in st.items()
               if k.startswith(f"{r}.evalbuf.")} for r in range(self.R)]
        self.eval_buffers = ev if any(ev) else None
        for name, sw in self.switches:
            pre = f"m.{name}."
            d = {k[len(pre):]: np.asarray(v) for k, v in st.items() if k.startswith(pre)}
            if hasattr(sw, "load_state"):
                sw.load_state(d)


def train_passes(eng, x, labels, passes: int, label: str = "pass") -> None:
    """Train population `eng` for `passes` passes over (x (n, r, r) numpy, labels) with train()'s
    (seed, pass) shift and dropout streams, a progress bar of the passes on a terminal, and no
    evaluation or checkpoints: for studies that keep their populations in memory (prune, transfer)."""
    from ..data import pass_randomness
    from ..report.progress import ProgressBar
    t, m = eng.cfg.train, eng.cfg.model
    bar = ProgressBar(passes, label=label)
    for p in range(passes):
        rand = [pass_randomness(s, p, len(x), t.shift, m.dropout, eng.dropout_units) for s in eng.seeds]
        eng.train_pass(x, labels, None, np.stack([r[0] for r in rand]) if t.shift > 0 else None,
                       np.stack([r[1] for r in rand]) if m.dropout > 0 else None)
        eng.end_pass()
        bar(p, len(x), len(x))
    bar.clear()
