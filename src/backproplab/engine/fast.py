"""The fast per-example engine: Net1989 replicas trained one example at a time on one core.

Semantics: the eager engine's (engine/eager.py) - for each example in order, zero_grad,
forward, loss.backward(), optimizer.step() with torch.optim.SGD / AdamW, or the 1989
optimizer's step (methods/sdlm.py: a Gauss-Newton diagonal estimate from the weights
before the step, a running average h, the step lr / (mu + h) * grad; _kernels_sdlm.py)
- for every replica. Numerics: float32, fused multiply-adds in a fixed order, tanh by a
rational approximation within ~5 ulp, denormals flushed to zero inside the kernels; so weights
agree with the eager engine to float tolerance (see tests/test_fast_engine.py), not bit
for bit.

Kernels (numba, explicit 16-lane SIMD, see _simd.py):
  _kernels_solo  one replica, lanes = image positions (~8 us a 1989 step here)
  _kernels_pop   16 replicas, lanes = replicas (~115 us a step, ~7 us per replica)
Both perform the same roundings in the same order for a replica, so any replica ends
bit-identical whichever kernel trained it. That makes the grouping free: full blocks of
16 replicas go to the population kernel; a remainder of fewer than SOLO_BELOW replicas
runs as solo replicas (a padded block would cost about as much as 16). Randomness (shift
and dropout masks) is data supplied by the caller, so every engine sees the same stream.
"""
import numpy as np

from ..models.net1989 import H2_TABLE, PARAM_NAMES, PARAM_SHAPES
from . import _layout as LY
from ._kernels_common import ACT, LOSS, OPT, OUT, aligned, aligned_copy
from ._simd import cpu_reason

SOLO_BELOW = 12          # measured: a 16-lane block step costs 12-15 solo steps (both recipes, this core)
# solo_pass's distillation term switched off (zero-size targets and unit mask, lam 0, T 1): the
# per-example recipes have none (the population engine's kernel path passes LwF's)
NO_SOFT = (np.zeros((0, 10), np.float32), np.zeros(0, np.float32), 0.0, 1.0)
_TABLE_KEYS = ("x4", "p1src", "p1win", "win", "winv", "g1t", "w1a", "w1b", "m2")
_TABLES = None


def _tables():
    global _TABLES
    if _TABLES is None:
        t = LY.solo_tables()
        _TABLES = tuple(np.ascontiguousarray(t[k]) for k in _TABLE_KEYS)
    return _TABLES


def _check_cpu():
    """The kernels use AVX2 and FMA, or AVX-512 (_simd.ISA); elsewhere numba could not compile them."""
    from llvmlite import binding
    why = cpu_reason(binding.get_host_cpu_features())
    if why:
        raise RuntimeError(f"the fast engine cannot run here: {why}; use --engine eager")


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(options)}")
    return options[value]


def _groups(R, kernel="auto"):
    """Replica indices per kernel call: [(kind, [r...])], kind 'pop' (<= 16) or 'solo' (1)."""
    if kernel == "solo":
        return [("solo", [r]) for r in range(R)]
    out, full = [], R - R % LY.L
    out += [("pop", list(range(b, b + LY.L))) for b in range(0, full, LY.L)]
    rest = list(range(full, R))
    if len(rest) >= SOLO_BELOW or (rest and kernel == "population"):
        out.append(("pop", rest))
    else:
        out += [("solo", [r]) for r in rest]
    return out


class FastPopulation:
    """R independent replicas of Net1989 trained per example, at once."""

    dropout_units = 192           # width of the keep masks train_pass takes

    def __init__(self, params, act="tanh", out_act="tanh", loss="mse", optim="sgd", weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, dropout=0.0, mu=0.02, gamma=0.01, kernel="auto"):
        """kernel: 'auto' (blocks of 16 on the population kernel, a small remainder solo),
        'population' or 'solo' (force one; the results are the same bit for bit)."""
        _check_cpu()
        if kernel not in ("auto", "population", "solo"):
            raise ValueError(f"kernel={kernel!r}: choose auto, population or solo")
        if optim == "sdlm" and not (mu > 0 and 0 < gamma <= 1):
            raise ValueError(f"sdlm needs mu > 0 and 0 < gamma <= 1 (got mu={mu}, gamma={gamma})")
        if len(params) == 0:
            raise ValueError("FastPopulation needs at least one replica")
        for p in params:
            for n in PARAM_NAMES:
                if tuple(np.shape(p[n])) != PARAM_SHAPES[n]:
                    raise ValueError(f"parameter {n} has shape {np.shape(p[n])}, expected {PARAM_SHAPES[n]}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.R = len(params)
        self.act, self.out_act, self.loss, self.optim = act, out_act, loss, optim
        self._codes = (_choice("act", act, ACT), _choice("out_act", out_act, OUT), _choice("loss", loss, LOSS),
                       _choice("optim", optim, {k: v for k, v in OPT.items() if k != "grad"}))
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(map(float, betas)), float(eps)
        self.dropout = float(dropout)
        self.mu, self.gamma = float(mu), float(gamma)
        self._scale = np.float32(1.0 / (1.0 - self.dropout))   # torch: x * keep * (1/(1-p)), scalar in float32
        self._groups = _groups(self.R, kernel)
        self._dummy = np.zeros(1, np.float32)                   # M, V of plain SGD (never touched)
        self._step = 0
        self._set(params)

    # ---- layouts: per group, the kernel's flat parameter / moment arrays ------------
    @staticmethod
    def _pack(kind, plist):
        return aligned_copy(LY.to_solo(plist[0]) if kind == "solo" else LY.to_pop(plist)[0])

    @staticmethod
    def _unpack(kind, arr, k):
        return [LY.from_solo(arr)] if kind == "solo" else [LY.from_pop(arr[None], r) for r in range(k)]

    def _set(self, params, m=None, v=None):
        """m, v: AdamW's moments, or for sdlm m = the running curvature h (v is then scratch
        for each example's estimate)."""
        self._P = [self._pack(kind, [params[r] for r in rs]) for kind, rs in self._groups]
        if self.optim in ("adamw", "sdlm"):
            self._M = [aligned_copy(np.zeros_like(p)) if m is None else self._pack(kind, [m[r] for r in rs])
                       for (kind, rs), p in zip(self._groups, self._P)]
            self._V = [aligned_copy(np.zeros_like(p)) if v is None else self._pack(kind, [v[r] for r in rs])
                       for (kind, rs), p in zip(self._groups, self._P)]
        else:
            self._M = self._V = None

    def _gather(self, arrays):
        out = [None] * self.R
        for (kind, rs), a in zip(self._groups, arrays):
            for r, p in zip(rs, self._unpack(kind, a, len(rs))):
                out[r] = p
        return out

    # ---- training -----------------------------------------------------------------
    def train_pass(self, x, labels, lr, shifts=None, keep=None) -> None:
        """Train every replica on x[i] (i in order), one optimizer step per example.

        x (N, 16, 16) float32; labels (N,) int; lr (N,) float32 per step; shifts (R, N, 2)
        int8 (dy, dx) in {-1, 0, 1}; keep (R, N, 192) bool dropout keep-mask.
        """
        x = aligned(np.asarray(x, np.float32).reshape(-1, 16, 16))   # copied only if misaligned
        n = len(x)
        labels = np.ascontiguousarray(np.asarray(labels).astype(np.int64, copy=False).reshape(-1))
        lr = np.ascontiguousarray(np.asarray(lr, np.float32).reshape(-1))
        if len(labels) != n or len(lr) != n:
            raise ValueError(f"x has {n} examples but labels {len(labels)} and lr {len(lr)}")
        if n and (labels.min() < 0 or labels.max() > 9):
            raise ValueError("labels must be in 0..9")
        if shifts is not None:
            shifts = np.asarray(shifts)
            if shifts.shape != (self.R, n, 2):
                raise ValueError(f"shifts has shape {shifts.shape}, expected {(self.R, n, 2)}")
            if np.abs(shifts).max(initial=0) > 1:
                raise ValueError("shifts must be in {-1, 0, 1}")
            shifts = shifts.astype(np.int8, copy=False)
        if keep is not None:
            keep = np.asarray(keep)
            if keep.shape != (self.R, n, 192):
                raise ValueError(f"keep has shape {keep.shape}, expected {(self.R, n, 192)}")
            keep = keep.astype(np.bool_, copy=False)
        elif self.dropout > 0:
            raise ValueError("dropout > 0 needs the keep masks (train_pass(..., keep=...))")
        if n == 0:
            return
        for g, (kind, rs) in enumerate(self._groups):
            sh = None if shifts is None else shifts[rs[0]:rs[-1] + 1]
            kp = None if keep is None else keep[rs[0]:rs[-1] + 1]
            M = self._M[g] if self._M is not None else self._dummy
            V = self._V[g] if self._V is not None else self._dummy
            _run(kind, x, labels, lr, sh, kp, self._scale, self._P[g], M, V, self._step,
                 self._args(self._codes[3]))
        self._step += n

    def _args(self, opt):
        act, out_act, loss, _ = self._codes
        b1, b2 = self.betas
        # smooth 0.0: the per-example recipes have no label smoothing (the population engine passes its own)
        return (act, out_act, loss, opt, self.weight_decay, b1, b2, self.eps, self.mu, self.gamma, 0.0)

    # ---- state --------------------------------------------------------------------
    def params(self) -> list:
        """Copies of every replica's parameters, PARAM_SHAPES, float32."""
        return self._gather(self._P)

    def state(self) -> dict:
        """Everything needed to resume bit-exactly: weights, AdamW moments or sdlm's running
        curvature (the eager engine's keys), step count (torch layouts, one key per replica and tensor)."""
        out = {"step": np.array(self._step, np.int64), "replicas": np.array(self.R, np.int64)}
        kept = ((("exp_avg.", self._M), ("exp_avg_sq.", self._V)) if self.optim == "adamw" else
                (("h.", self._M),) if self.optim == "sdlm" else ())
        for what, arrs in (("", self._P),) + kept:
            if arrs is None:
                continue
            for r, p in enumerate(self._gather(arrs)):
                for n in PARAM_NAMES:
                    out[f"{r}.{what}{n}"] = p[n]
        return out

    def load_state(self, state: dict) -> None:
        if int(np.asarray(state.get("replicas", self.R))) != self.R:
            raise ValueError(f"state is for {int(state['replicas'])} replicas, this population has {self.R}")

        def get(what):
            return [{n: np.asarray(state[f"{r}.{what}{n}"], np.float32) for n in PARAM_NAMES} for r in range(self.R)]
        if self.optim == "adamw":
            self._set(get(""), get("exp_avg."), get("exp_avg_sq."))
        elif self.optim == "sdlm":
            self._set(get(""), get("h."))
        else:
            self._set(get(""))
        self._step = int(np.asarray(state["step"]))


def _lanes(a, n, width, fill, dtype):
    """(r, n, width) masks of a group -> (16, n, width) contiguous, spare lanes `fill`."""
    if a is None:
        return np.zeros((0, n, width), dtype)
    if len(a) == LY.L:
        return np.ascontiguousarray(a)
    out = np.full((LY.L, n, width), fill, dtype)
    out[:len(a)] = a
    return out


# the solo kernel's model-noise inputs switched off (spatial dropout, DropConnect: engine/kernelgrad.py)
NO_MAPS, NO_DC = np.zeros((0, 12), np.float32), np.zeros((0, 5760), np.float32)


def _run(kind, x, labels, lr, shifts, keep, scale, P, M, V, step, args):
    """One kernel call: train P (one group) on x; M, V its moments (or the gradient buffer)."""
    n = len(x)
    if kind == "solo":
        from ._kernels_solo import solo_pass
        sh = np.zeros((0, 2), np.int8) if shifts is None else np.ascontiguousarray(shifts[0])
        kp = np.zeros((0, 192), np.bool_) if keep is None else np.ascontiguousarray(keep[0])
        solo_pass(x, labels, lr, sh, kp, NO_MAPS, NO_DC, scale, P, M, V, np.array([step], np.int64), *args, _tables(),
                  np.zeros(1, np.int64), *NO_SOFT)
    else:
        from ._kernels_pop import pop_pass
        pop_pass(x, labels, lr, _lanes(shifts, n, 2, 0, np.int8), _lanes(keep, n, 192, True, np.bool_), scale,
                 P, M, V, np.array([step], np.int64), *args, H2_TABLE, LY.H1_POS, np.zeros(1, np.int64))


def example_grads(params: dict, x, label: int, act="tanh", out_act="tanh", loss="mse", shift=None, keep=None,
                  dropout=0.0, population=False) -> dict:
    """The fast engine's gradient of one example's loss for every parameter (torch layouts).

    x (16, 16); shift (dy, dx) or None; keep (192,) bool or None. population=True runs the
    population kernel (the replica in lane 0 of a block) instead of the solo kernel.
    """
    return _one_example("grad", params, x, label, act, out_act, loss, shift, keep, dropout, population)


def example_curvature(params: dict, x, label: int, act="tanh", out_act="tanh", loss="mse", shift=None, keep=None,
                      dropout=0.0, population=False) -> dict:
    """The fast engine's Gauss-Newton diagonal estimate of one example (what sdlm averages;
    methods/sdlm.py's net1989_gn_diag), torch layouts; arguments as example_grads."""
    return _one_example("sdlm", params, x, label, act, out_act, loss, shift, keep, dropout, population)


def _one_example(what, params, x, label, act, out_act, loss, shift, keep, dropout, population):
    """One kernel step with lr 0: 'grad' leaves the gradient in M; 'sdlm' with gamma = 1
    leaves h = 1 * estimate + 0 * h, the estimate exactly, in M."""
    kind = "pop" if population else "solo"
    fp = FastPopulation([params], act=act, out_act=out_act, loss=loss, dropout=dropout,
                        optim="sdlm" if what == "sdlm" else "sgd", gamma=1.0)
    P = FastPopulation._pack(kind, [params])
    M, V = aligned_copy(np.zeros_like(P)), aligned_copy(np.zeros_like(P))
    sh = None if shift is None else np.asarray(shift, np.int8).reshape(1, 1, 2)
    kp = None if keep is None else np.asarray(keep, np.bool_).reshape(1, 1, 192)
    _run(kind, aligned_copy(np.asarray(x, np.float32).reshape(1, 16, 16)), np.array([label], np.int64),
         np.zeros(1, np.float32), sh, kp, fp._scale, P, M, V, 0, fp._args(OPT[what]))
    return FastPopulation._unpack(kind, M, 1)[0]
