"""Minibatch gradients of a Net1989 population from the per-example numba kernels.

The population engine's fastest path. The kernels of the fast engine (_kernels_solo: one
replica, lanes = image positions; _kernels_pop: 16 replicas, lanes = replicas) run with
opt 'accumulate': for each example of the batch, forward and hand-derived backward at
the same weights, the gradient added into M; the engine divides by the batch size and
hands the mean to the registry's optimizer like any other gradient. So the kernels
compute exactly the sum the autograd path differentiates (tests check it against
autograd), and every method that acts on gradients and weights composes with them.

Curvature (`grad(..., curvature=True)`, for sdlm): the solo kernel's opt 'accumulate_gn'
also runs its per-example curvature pass (_kernels_sdlm.py, the 1989 optimizer's) and
adds each example's Gauss-Newton diagonal estimate into V, at the same weights as the
gradient; V's sum comes back in torch's order divided by the batch size like the
gradient: methods/sdlm.py's net1989_gn_diag over the batch, / B, without a torch pass per
replica and step. Solo groups only (per_replica_inputs, as sdlm's needs_inputs makes them):
the population kernel has no such mode.

Why numba here: at batch 32 a minibatch step of this 9,760-parameter net is a few hundred
thousand multiply-adds in tiny pieces; PyTorch pays microseconds per op and the Toeplitz
products of models/fused1989.py waste most of their work on structural zeros at small
batches (measured in benchmarks/bench_engine.py). The kernels do a step's examples at
about 5-10 us each on one core.

Layouts: the engine's weights are (R, 9760) in Net1989's PARAM_NAMES order. The solo
kernel's flat layout (engine/_layout.py) is a permutation of those with zero padding,
gathered through an index map built once; the population kernel's is the torch layout
with a trailing axis of 16 lanes (a transpose). Inputs: the raw images shared by all
replicas with per-replica integer shifts done inside the kernels, or (when a data method
has transformed each replica's batch, or a switch reads it) each replica's own images on the
solo kernel. The model methods' noise comes in as masks the engine draws: H2 keep masks (both
kernels), spatial dropout's H1 plane factors and DropConnect's H3 weight factors (the solo
kernel: a population with them runs every replica there, about 13% slower per replica than
the population kernel).

Loss terms: the kernels differentiate the cross-entropy (with label smoothing) or the MSE; the
solo kernel also adds a distillation term toward per-example target probabilities computed
outside it (LwF's frozen net, by the evaluation kernel: engine/population.py), so a population
with that term runs every replica on the solo kernel.

Evaluation: `outputs` (and `net_outputs`, for the per-example engines' engine/evaluate.py) run
the forward-only kernel of _kernels_eval.py on the weights in torch's layout as they are:
lanes = images, all replicas in one call.
"""
import numpy as np
import torch
from llvmlite import binding

from ..models.net1989 import H2_TABLE, PARAM_NAMES, PARAM_SHAPES
from . import _layout as LY
from ._kernels_common import ACT, LOSS, OPT, OUT, aligned_copy
from ._simd import cpu_reason
from .fast import NO_SOFT, _groups, _lanes, _tables

N_THETA = sum(int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES)


def kernel_reason(cfg) -> str | None:
    """Why the numba kernels cannot compute this run's gradients, or None."""
    why = _cpu_reason()
    if why:
        return why
    m = cfg.model
    if m.name != "net1989" or m.act not in ACT or m.out_act not in OUT or cfg.train.loss not in LOSS:
        return "the numba kernels are Net1989's"
    return None


def _cpu_reason() -> str | None:
    return cpu_reason(binding.get_host_cpu_features())


def outputs_reason(act, out_act) -> str | None:
    """Why the evaluation kernel cannot compute Net1989's outputs with these activations, or None."""
    why = _cpu_reason()
    if why:
        return why
    if act not in ACT or out_act not in OUT:
        return "the numba kernels are Net1989's"
    return None


def net_outputs(W, x, act, out_act) -> torch.Tensor:
    """Net1989's eval-mode forward by the evaluation kernel (_kernels_eval.py): W (R, 9760) in
    PARAM_NAMES order, x (B, 1, 16, 16) or (B, 16, 16), any strides -> (R, B, 10) float32."""
    from ._kernels_eval import eval_pass
    Wn = np.ascontiguousarray(W.detach().cpu().numpy() if torch.is_tensor(W) else W, np.float32)
    if Wn.ndim != 2 or Wn.shape[1] != N_THETA:
        raise ValueError(f"weights of shape {Wn.shape}, expected (R, {N_THETA})")
    xn = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    xn = np.ascontiguousarray(xn.reshape(-1, 256), np.float32)          # copies only if it must
    out = np.empty((Wn.shape[0], xn.shape[0], 10), np.float32)
    eval_pass(xn, Wn.reshape(-1), out, ACT[act], OUT[out_act], H2_TABLE)
    return torch.from_numpy(out)


def _solo_maps():
    """solo position -> torch flat index + 1 (0: a padding zero), and torch index -> solo position."""
    cols = np.cumsum([0] + [int(np.prod(PARAM_SHAPES[n])) for n in PARAM_NAMES])
    enc = {n: (np.arange(a, b, dtype=np.float64) + 1).reshape(PARAM_SHAPES[n])
           for n, a, b in zip(PARAM_NAMES, cols[:-1], cols[1:])}
    src = LY.to_solo(enc).astype(np.int64)             # float32 holds integers up to 2^24 exactly
    inv = np.empty(N_THETA, np.int64)
    pos = np.nonzero(src)[0]
    inv[src[pos] - 1] = pos
    assert len(pos) == N_THETA
    return torch.from_numpy(src), torch.from_numpy(inv)


class KernelGrad:
    def __init__(self, R, act, out_act, loss, dropout, per_replica_inputs=False, smooth=0.0, solo=False):
        """solo: every replica on the solo kernel (its model-noise inputs, maps and dcm, are the solo
        kernel's only); per-replica inputs imply it."""
        self.R, self.act, self.out_act = R, act, out_act
        self.codes = (ACT[act], OUT[out_act], LOSS[loss], OPT["accumulate"])
        self.scale = np.float32(1.0 / (1.0 - dropout))
        self.groups = _groups(R, "solo" if per_replica_inputs or solo else "auto")
        src, inv = _solo_maps()
        self.src, self.inv = src.numpy(), inv.numpy()
        self.prof, self.step = np.zeros(1, np.int64), np.zeros(1, np.int64)   # step: counted, never used by opt 4
        # optimizer constants (unused by opt 4), then the cross-entropy's label smoothing
        self.rest = (*self.codes, 0.0, 0.9, 0.999, 1e-8, 0.02, 0.01, float(smooth))
        self.rest_gn = (*self.codes[:3], OPT["accumulate_gn"], *self.rest[4:])    # grad(curvature=True)
        self.tables, self._zeros, self._buf = _tables(), {}, {}
        self._no_h = np.zeros((0, N_THETA), np.float32)

    def _empty(self, width, dtype):
        """(R, 0, width): a per-replica input that is absent (the kernels test its length)."""
        key = ("empty", width, np.dtype(dtype).str)
        a = self._buf.get(key)
        if a is None:
            a = self._buf[key] = np.zeros((self.R, 0, width), dtype)
        return a

    def _aligned(self, key, shape):
        a = self._buf.get((key, shape))
        if a is None:
            a = self._buf[(key, shape)] = aligned_copy(np.zeros(shape, np.float32))
        return a

    def grad(self, W, x, labels, shifts=None, keep=None, maps=None, dcm=None, soft=None, curvature=False):
        """W (R, 9760); x (B, 16, 16) shared, or (R, B, 16, 16) per replica (solo groups only);
        labels (B,); shifts (R, B, 2) int8 numpy or None; keep (R, B, 192) bool numpy or None;
        maps (R, B, 12) spatial dropout factors and dcm (R, B, 5760) DropConnect factors of H3's
        weights, float32 numpy or None (solo groups only); soft None or (p (R, B, 10) float32
        numpy, units (10,) float32 0/1, lam, T): a distillation term lam T^2 KL(p[r, b] ||
        softmax(z[u] / T)) over the units u added to each example's loss (LwF; solo groups
        only: _kernels_solo._soft_grad) -> (R, 9760) the batch-mean gradient of each replica's
        loss; with curvature (solo groups only) -> (G, H), H (R, 9760) the batch mean of each
        example's Gauss-Newton diagonal estimate (net1989_gn_diag / B), in the same order."""
        from ._kernels_pop import pop_pass
        from ._kernels_solo import solo_grads
        pop = any(kind != "solo" for kind, _ in self.groups)
        if pop and (maps is not None or dcm is not None):
            raise ValueError("spatial dropout and DropConnect factors run on the solo kernel: KernelGrad(..., solo=True)")
        if pop and soft is not None:
            raise ValueError("a distillation term runs on the solo kernel only: build KernelGrad with "
                             "per_replica_inputs=True")
        if pop and curvature:
            raise ValueError("the curvature sums come from the solo kernel only: KernelGrad(per_replica_inputs=True)")
        B = labels.shape[0]
        lab = np.ascontiguousarray(labels.numpy().astype(np.int64, copy=False))
        zeros = self._zeros.get(B)
        if zeros is None:
            zeros = self._zeros[B] = np.zeros(B, np.float32)             # lr: unused by 'accumulate'
        rest, step = self.rest_gn if curvature else self.rest, self.step
        Wn = np.ascontiguousarray(W.detach().cpu().numpy())
        G = np.empty((self.R, N_THETA), np.float32)
        H = np.empty((self.R, N_THETA), np.float32) if curvature else None
        inv_b = np.float32(1.0 / B)            # the batch mean
        shared = x.dim() == 3
        if shared:
            xs = self._aligned("x", (B, 16, 16))
            xs[...] = x.numpy()
        solo = np.array([r for kind, rs in self.groups if kind == "solo" for r in rs], np.int64)
        if len(solo):
            R, T = self.R, LY.SOLO_OFFSETS["total"]
            if shared:
                X = xs.reshape(1, B, 16, 16)
            else:
                X = self._aligned("xr", (R, B, 16, 16))
                X[...] = x.numpy()
            def per_replica(a, width, dtype):   # (R, B, width), or (R, 0, width) when absent
                if a is None:
                    return self._empty(width, dtype)
                a = a.numpy() if torch.is_tensor(a) else a
                return np.ascontiguousarray(a, dtype).reshape(R, B, width)
            if soft is not None:   # the targets per replica; the unit mask, lam and T shared
                soft_p, units, lam, T_ = soft
                soft_rest = (np.ascontiguousarray(units, np.float32), float(lam), float(T_))
            else:
                soft_p, soft_rest = None, NO_SOFT[1:]
            M = self._aligned("Msolo", (T,))
            V = self._aligned("Vsolo", (T,)) if curvature else M   # opt 4 never touches V
            solo_grads(solo, Wn, self.src, self.inv, X, lab, zeros, per_replica(shifts, 2, np.int8),
                        per_replica(keep, 192, np.bool_), per_replica(maps, 12, np.float32),
                        per_replica(dcm, 5760, np.float32), per_replica(soft_p, 10, np.float32), self.scale,
                        self._aligned("Psolo", (T,)), M, V, step, *rest,
                        self.tables, self.prof, *soft_rest, inv_b, G, H if curvature else self._no_h)
        for kind, rs in self.groups:
            if kind == "solo":
                continue
            sh = None if shifts is None else shifts[rs[0]:rs[-1] + 1]
            kp = None if keep is None else keep[rs[0]:rs[-1] + 1]
            P = self._aligned("Ppop", (N_THETA, LY.L))
            M = self._aligned("Mpop", (LY.POP_OFFSETS["total"],))
            P[:, :len(rs)] = Wn[rs].T
            P[:, len(rs):] = Wn[rs[0]][:, None]   # spare lanes: copies of a real replica (finite numbers)
            M[...] = 0.0
            pop_pass(xs, lab, zeros, _lanes(sh, B, 2, 0, np.int8), _lanes(kp, B, 192, True, np.bool_), self.scale,
                     P.reshape(-1), M, M, step, *rest, H2_TABLE, LY.H1_POS, self.prof)
            G[rs] = M.reshape(N_THETA, LY.L)[:, :len(rs)].T * inv_b
        if curvature:
            return torch.from_numpy(G).to(W.device), torch.from_numpy(H).to(W.device)
        return torch.from_numpy(G).to(W.device)

    def outputs(self, W, x) -> torch.Tensor:
        """W (R, 9760), x (B, 1, 16, 16) -> (R, B, 10): the eval-mode outputs (no dropout)."""
        return net_outputs(W, x, self.act, self.out_act).to(W.device)


def warm_up() -> None:
    """Load (or compile) the kernels once, untimed: the first call of a process reads them from
    numba's cache (about half a second here) or compiles them (about a minute on a new install)."""
    from ..data.augment import shift_stack
    from ..models.net1989 import init_params
    from .fast import example_grads
    kg = KernelGrad(1, "relu", "none", "ce", 0.0)
    kg.grad(torch.zeros(1, N_THETA), torch.zeros(1, 16, 16), torch.zeros(1, dtype=torch.long))   # solo_grads
    example_grads({k: v.numpy() for k, v in init_params(0).items()}, np.zeros((16, 16), np.float32), 0,
                  "relu", "none", "ce")       # solo_pass called as the per-example engines call it
    shift_stack(torch.zeros(1, 1, 16, 16), np.zeros((1, 1, 2), np.int8))   # the per-pass shifted copies
    kg.groups = [("pop", [0])]
    kg.grad(torch.zeros(1, N_THETA), torch.zeros(1, 16, 16), torch.zeros(1, dtype=torch.long))
    kg.outputs(torch.zeros(1, N_THETA), torch.zeros(1, 16, 16))
