"""Distillation: a teacher's softened outputs as targets (Hinton et al. 2015) and Learning without
Forgetting (Li & Hoiem 2016), a distillation term toward a frozen copy of the net the run starts from.

distill  The teacher is a finished run folder (`backproplab train ... --out DIR`): its latest
         finished run, every seed of it (a run of several seeds is an ensemble: the soft targets
         are the mean of the seeds' tempered softmaxes), evaluated as that run evaluates (its
         averaged weights, its test-time method). The student's criterion becomes the weighted
         average (1 - alpha) CE(y, s) + alpha T^2 KL(p_T(teacher) || p_T(s)), p_T = softmax(z / T);
         T^2 keeps the soft term's gradient the size of the hard one's as T changes. Born-again
         self-distillation is a teacher folder holding the same net. Soft targets are computed on
         the fly for each batch as the student sees it, or cached once per distinct training image
         (then no augmentation may change the images).
lwf      At the first pass of the run (step 0) the switch keeps a frozen copy of every replica's
         weights (and BatchNorm statistics): the pre-trained net when the run starts from one. Each
         step adds lam T^2 KL(p_T(old) || p_T(new)) over the old task's output units to the loss.

distill runs on autograd (its teacher is another run's engine). lwf runs on the autograd path
(`loss`: the frozen copies as modules, any ModNet, e.g. with BatchNorm) or on the kernel path
(`kernel_soft`): there the engine evaluates the frozen weights with the evaluation kernel on each
replica's batch as its model sees it (hence needs_inputs), p_old = softmax(z_old[u] / T), and the
solo kernel adds the term's per-example logit gradient lam T (softmax(z[u] / T) - p_old) on the
units u to the cross-entropy's; the engine's division by the batch size makes it the batch mean's.
The fused products return the cross-entropy's gradient only.
"""
import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import UserError
from .registry import Method, Option, register


def soft_kl(student: torch.Tensor, teacher_p: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 KL(teacher_p || softmax(student / T)), mean over the batch: student (..., B, K) logits,
    teacher_p (..., B, K) probabilities (broadcast) -> (...)."""
    logq = F.log_softmax(student / T, dim=-1)
    logp = torch.log(teacher_p.clamp_min(1e-30))
    return (T * T) * (teacher_p * (logp - logq)).sum(-1).mean(-1)


def tempered(logits: torch.Tensor, T: float) -> torch.Tensor:
    return F.softmax(logits.float() / T, dim=-1)


# -- the teacher: a finished run folder ------------------------------------------------------------
_TEACHERS = {}   # (folder, checkpoint, mtime, size) -> (cfg, engine state, run record)


def _finished_run(folder: str):
    """(teacher Config, its engine state, checkpoint path) of the latest finished run in folder."""
    from ..config import from_dict
    from ..engine.checkpoint import has_checkpoint, load_checkpoint
    from ..engine.train import checkpoint_path
    from ..store import list_runs
    if not folder:
        return None
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"teacher={folder}: no such folder")
    try:
        runs = list_runs(path)
    except UserError:
        runs = []
    for rec in reversed(runs):
        if rec["status"] != "finished" or not isinstance(rec.get("config"), dict) or "train" not in rec["config"]:
            continue
        try:
            cfg = from_dict(rec["config"])
        except (UserError, TypeError, ValueError, KeyError):
            continue
        ckpt = checkpoint_path(cfg, path)
        if cfg.train.engine != "population" or not has_checkpoint(ckpt):
            continue
        st = ckpt.stat()
        key = (str(path.resolve()), str(ckpt), st.st_mtime_ns, st.st_size)
        if key not in _TEACHERS:
            state = load_checkpoint(ckpt)
            if int(state.get("passes_done", -1)) != cfg.train.passes or state.get("status", "finished") != "finished":
                continue
            _TEACHERS[key] = (cfg, state["engine"], ckpt)
        return _TEACHERS[key]
    raise UserError(f"teacher={folder}: no finished population run with its checkpoint in that folder "
                    f"(train one with --out {folder})")


def _input_shape(cfg) -> tuple:
    return (cfg.data.source, int(cfg.data.resolution))


def check_teacher(cfg, opts) -> str | None:
    if not opts["teacher"]:
        return "needs teacher=DIR, a folder holding a finished run (born-again: a run of this same net)"
    if cfg.train.loss != "ce":
        return f"needs train.loss=ce (soft targets are for logits), not {cfg.train.loss}"
    tcfg, _, _ = _finished_run(opts["teacher"])
    if tcfg.train.loss != "ce" or tcfg.model.out_act != "none":
        return (f"teacher={opts['teacher']}: its run has train.loss={tcfg.train.loss}, model.out_act="
                f"{tcfg.model.out_act}; distillation needs logits (ce, out_act=none)")
    if _input_shape(tcfg) != _input_shape(cfg):
        (ts, tside), (ss, sside) = _input_shape(tcfg), _input_shape(cfg)
        return (f"teacher={opts['teacher']}: its run saw data {ts} at {tside}x{tside}, this run sees "
                f"{ss} at {sside}x{sside}")
    if opts["targets"] == "cached" and cfg.train.shift:
        return "targets=cached are the teacher's outputs on the unshifted images: set train.shift=0 or targets=live"
    return None


class Teacher:
    """The teacher run's evaluated function: x (B, 1, r, r) -> (B, 10) mean tempered softmax."""

    def __init__(self, folder: str):
        from ..engine.checkpoint import to_numpy_state
        from ..engine.population import Population
        cfg, state, _ = _finished_run(folder)
        self.cfg = copy.deepcopy(cfg)
        self.cfg.train.device = "cpu"
        seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]
        self.pop = Population(self.cfg, seeds)
        self.pop.load_state(to_numpy_state(state))

    @torch.no_grad()
    def probs(self, x: torch.Tensor, T: float) -> torch.Tensor:
        return tempered(self.pop.outputs(x.detach().cpu()), T).mean(0)


class Distill:
    def __init__(self, opts, **ctx):
        self.T, self.alpha, self.cached = opts["T"], opts["alpha"], opts["targets"] == "cached"
        self.folder, self._teacher = opts["teacher"], None
        self.ctx, self.cache = None, None

    @property
    def teacher(self):  # built when first needed: a switch is also built just to read its hooks
        if self._teacher is None:
            self._teacher = Teacher(self.folder)
        return self._teacher

    def pass_start(self, ctx):
        self.ctx = ctx  # the criterion reads the step's batch from it
        if self.cached and self.cache is None:
            x = torch.as_tensor(np.asarray(ctx.pass_x), dtype=torch.float32)
            side = math.isqrt(x[0].numel())                  # the run's data.resolution
            x = x.reshape(-1, 1, side, side)
            p = torch.cat([self.teacher.probs(x[a:a + 2048], self.T) for a in range(0, len(x), 2048)])
            keys = x.reshape(len(x), -1).numpy()
            self.cache = ({k.tobytes(): i for i, k in enumerate(keys)}, p)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, B, 1, r, r) -> (R or 1, B, 10) soft targets."""
        same = x.stride(0) == 0 or x.shape[0] == 1   # every replica sees one batch: one teacher pass
        xs = x[:1] if same else x
        if self.cached:
            index, p = self.cache
            rows = xs.reshape(-1, 256).cpu().numpy()
            try:
                idx = [index[r.tobytes()] for r in rows]
            except KeyError:
                raise UserError("distill targets=cached: a training image the cache has not seen (a batch "
                                "method changed it): use targets=live") from None
            return p[idx].reshape(xs.shape[0], -1, p.shape[-1]).to(x.device)
        return torch.stack([self.teacher.probs(xr, self.T) for xr in xs]).to(x.device)

    def criterion(self, out, labels):  # (R, B, 10) -> (R,)
        hard = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.expand(out.shape[:-1]).reshape(-1),
                               reduction="none").reshape(out.shape[:-1]).mean(-1)
        soft = soft_kl(out, self.targets(self.ctx.x), self.T)
        return (1.0 - self.alpha) * hard + self.alpha * soft


def parse_classes(text: str) -> list:
    """'all' -> 0..9; 'a-b' -> a..b inclusive; 'k' -> [k]."""
    if text == "all":
        return list(range(10))
    a, sep, b = text.partition("-")
    try:
        lo, hi = int(a), int(b) if sep else int(a)
    except ValueError:
        raise UserError(f"method lwf: classes={text!r}: expected all, k or a-b (output units 0-9)") from None
    if not 0 <= lo <= hi <= 9:
        raise UserError(f"method lwf: classes={text!r}: units must be 0 <= a <= b <= 9")
    return list(range(lo, hi + 1))


def check_lwf(cfg, opts):
    units = parse_classes(opts["classes"])
    if len(units) < 2:
        return f"classes={opts['classes']}: a softmax over one output unit is constant; give at least two"
    return None


class LwF:
    needs_inputs = True  # the kernel path evaluates the frozen net on each replica's batch as its model sees it

    def __init__(self, opts, **ctx):
        self.lam, self.T = opts["lam"], opts["T"]
        self.units = torch.tensor(parse_classes(opts["classes"]))
        self.mask = np.zeros(10, np.float32)     # the units as the kernels take them: 1 on u
        self.mask[self.units.numpy()] = 1.0
        self.old, self.old_bufs, self.frozen = None, None, None

    def pass_start(self, ctx):
        if self.old is None and getattr(ctx, "step", None) is None:  # no step taken yet by this engine
            self.old = ctx.w.detach().clone()
            self.old_bufs = [{n: b.detach().clone() for n, b in m.named_buffers() if n.endswith(("_rm", "_rv"))}
                             for m in ctx.models]
        if self.frozen is None and self.old is not None:
            self._freeze(ctx)

    def _freeze(self, ctx):  # the modules the autograd path's loss evaluates (the kernel path: old alone)
        self.frozen = []
        for r, m in enumerate(ctx.models):
            gen, m.gen = getattr(m, "gen", None), None
            try:
                f = copy.deepcopy(m).eval()
            finally:
                m.gen = gen
            for p in f.parameters():
                p.requires_grad_(False)
            with torch.no_grad():
                for n, b in f.named_buffers():
                    if n in self.old_bufs[r]:
                        b.copy_(self.old_bufs[r][n])
            self.frozen.append(f)
        self.names = list(ctx.param_names)
        self.old_views = ctx.views_of(self.old)

    @torch.no_grad()
    def old_outputs(self, x):  # x (R, B, 1, 16, 16) -> (R, B, 10) outputs of the frozen copies
        return torch.stack([functional_call(f, {n: self.old_views[n][r] for n in self.names}, (x[r],)).float()
                            for r, f in enumerate(self.frozen)])

    def loss(self, ctx, out, labels, value):
        """The autograd path: value + lam T^2 KL(p_T(old) || p_T(out)) over the units, batch mean."""
        u = self.units.to(out.device)
        p_old = tempered(self.old_outputs(ctx.x)[..., u], self.T)
        return value + self.lam * soft_kl(out[..., u].float(), p_old, self.T)

    def kernel_soft(self, ctx, outputs):
        """The kernel path: outputs(W, x) -> (R, B, 10) the eval-mode outputs of (R, P) weights on
        each replica's batch x (R, B, 1, 16, 16), as the path computes its model (the engine's).
        -> (p_old (R, B, 10) float32, 0 off the units; the unit mask (10,); lam; T) for the solo
        kernel, which adds lam T (softmax(z[u] / T) - p_old) to each example's logit gradient: the
        gradient of lam T^2 KL(p_old || softmax(z[u] / T)) (Hinton et al.'s eq. 2 times T^2)."""
        u = self.units
        z = outputs(self.old, ctx.x)
        p = torch.zeros(z.shape, dtype=torch.float32)
        p[..., u] = tempered(z[..., u], self.T).cpu()
        return p.numpy(), self.mask, self.lam, self.T

    def state(self):
        if self.old is None:
            return {}
        st = {"old": self.old}
        for r, bufs in enumerate(self.old_bufs):
            st.update({f"buf{r}.{n}": b for n, b in bufs.items()})
        return st

    def load_state(self, d):
        self.frozen = None
        if "old" not in d:
            self.old, self.old_bufs = None, None
            return
        self.old = torch.as_tensor(d["old"]).clone()
        R = self.old.shape[0]
        self.old_bufs = [{k.split(".", 1)[1]: torch.as_tensor(v).clone() for k, v in d.items()
                          if k.startswith(f"buf{r}.")} for r in range(R)]


register(Method(
    "distill", kind="distillation", touches=("loss",), hooks=("pass_start", "loss"), impl="distill:Distill",
    autograd=True, check=check_teacher,
    options={"teacher": Option("", "folder", "a finished run folder (--out DIR of its train run)"),
             "T": Option(4.0, "temperature", "softmax(z / T) for both nets", 0.05, 100.0),
             "alpha": Option(0.5, "weight", "of the soft term; the label term has 1 - alpha", 0.0, 1.0),
             "targets": Option("live", "", "teacher on each batch, or once per training image",
                               choices=("live", "cached"))},
    incompatible_with={"label_smoothing": "both replace the criterion (distill's hard term is plain CE)"},
    summary="knowledge distillation from a finished run (one net or an ensemble of seeds)",
    what="Criterion (1 - alpha) CE(y, z) + alpha T^2 KL(p_T || softmax(z / T)), p_T the teacher run's mean "
         "over its seeds of softmax(z_teacher / T), the teacher evaluated as its run evaluates (averaged "
         "weights, test-time shifts). Born-again: a teacher folder holding the same net.",
    paper="Hinton, Vinyals & Dean 2015, 'Distilling the Knowledge in a Neural Network'; Furlanello et al. "
          "2018 (born-again networks)",
    oracle="torch.nn.functional.kl_div and cross_entropy on the teacher's outputs; the soft term's logit "
           "gradient T (q - p) (Hinton eq. 2 times T^2)"))
register(Method(
    "lwf", kind="distillation", touches=("loss",), hooks=("pass_start", "loss"), impl="distill:LwF",
    fast_paths=("kernel",), check=check_lwf,
    options={"lam": Option(1.0, "weight", "lambda_o of the old-task term", 0.0, 100.0),
             "T": Option(2.0, "temperature", "the paper's T = 2", 0.05, 100.0),
             "classes": Option("all", "output units", "the old task's units: all, k or a-b (e.g. 0-4)")},
    summary="Learning without Forgetting: distill toward a frozen copy of the starting net",
    what="At step 0 the weights each replica starts from (a pre-trained net) are frozen; every step adds "
         "lam T^2 KL(softmax(z_old / T) || softmax(z / T)) over the old task's output units, z_old the "
         "frozen copy's outputs on the same batch (eval mode: no noise, its BatchNorm statistics).",
    interactions="On the kernel path every replica trains on the solo kernel (the one that adds the term) and "
                 "the frozen net is evaluated by the evaluation kernel; with a model change the kernels lack "
                 "(batchnorm, ...) it runs on the autograd path, the frozen copies as modules.",
    paper="Li & Hoiem 2016/2018, 'Learning without Forgetting'",
    oracle="the frozen start's outputs by hand and torch.nn.functional.kl_div: same loss and step"))
