"""A tiny diagonal state-space model (S4D: Gu et al. 2022, with the LRU's parametrization of the
eigenvalues and input normalization: Orvieto et al. 2023) reading a 16x16 digit as a sequence of
256 pixels.

  u: the 256 pixels in row order (model.seq=inorder) or in one fixed permutation (permuted,
     PERM: torch.randperm(256) from a generator seeded 0), one scalar per step
  encoder: h_k = enc_w u_k + enc_b                                           (B, H, 256)
  depth x [LayerNorm over the H channels, diagonal SSM, GELU, linear H -> H, residual add]
  mean over the 256 steps, dropout there (H units), linear -> 10 logits

The SSM layer: each of the H channels v_h has its own N complex states (single input,
single output, as in S4D):
  x_k = lam * x_(k-1) + gamma * B v_k,   y_k = Re(sum_n C_n x_k,n) + D v_k
with lam = exp(-exp(nu) + i exp(theta)) (|lam| < 1 for any real nu: stable by
construction), gamma = sqrt(1 - |lam|^2) (the input normalization that keeps a state's
variance independent of |lam|), B and C complex (H, N), D real (H,).

Eigenvalue initialization (`eigen_init`): init="s4d" (the default) is S4D-Lin discretized by a
zero-order hold, lam_n = exp(dt A_n) with A_n = -1/2 + i pi n, n = 0..N-1, and one step dt per
channel drawn log-uniform in [DT_MIN, DT_MAX] = [1e-3, 1e-1]: |lam| in [0.951, 0.9995] and a
ladder of frequencies pi n dt in each channel. init="lru" is the LRU ring: |lam|^2 uniform in
[r_min^2, r_max^2], the phase uniform in [0, max_phase]. On validation digits S4D-Lin beat the
ring (0.9-0.999, phases up to pi/8 or 2 pi) by far (docs/cheaper-nets.md; scripts/ssm_variants.py).
Options kept for that comparison (off by default; the counts below are for the default block):
a_lr scales nu and theta (stored divided by a_lr, used times a_lr: an Adam step moves them a_lr
times as far, the SSM papers' lower rate for A), enc_bias (a random encoder bias), final_norm (a
LayerNorm on the pooled features), glu (mixing H -> 2 H, then a GLU).

Two forms compute the same y: the recurrence (`recurrent_form`, a loop over the 256 steps,
what the model means) and the parallel form used for training (`parallel_form`: y is the
causal convolution of v with the kernel K_j = Re(sum_n C_n gamma_n B_n lam_n^j), one kernel
per channel, computed once a batch, and the convolution done with real FFTs of length
512). tests/test_ssm.py checks they agree.

Parameters per layer: 6 H N + H^2 + 4 H (nu, theta, B and C: 6 H N real numbers; mixing
H^2 + H; LayerNorm 2 H; D H); with dim 32 (the ssm preset), 18 states and depth 2: 9,610 in all
(the 1989 net: 9,760). Multiply-adds per image (ssm_macs) count the recurrent form's real
multiply-adds: per step, layer and channel 8 N (lam x: 4 N, B v: 2 N, Re C x: 2 N), 1 (D v)
and H (mixing); the FFT's own count is lower and is not the model's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

L = 256                    # steps: 16 x 16 pixels
STATES = 18                # N complex states per channel
R_MIN, R_MAX = 0.9, 0.999  # init=lru: initial |lam|, memories of about 10 to 1,000 steps
MAX_PHASE = math.pi / 8    # init=lru: initial phases up to this
DT_MIN, DT_MAX = 1e-3, 1e-1  # S4D-Lin's range of discretization steps
_PERM_SEED = 0


def permutation() -> torch.Tensor:
    """The fixed pixel order of model.seq=permuted."""
    return torch.randperm(L, generator=torch.Generator().manual_seed(_PERM_SEED))


def ssm_params(dim: int, depth: int, states: int = STATES) -> int:
    return 2 * dim + depth * (6 * dim * states + dim * dim + 4 * dim) + 10 * dim + 10


def ssm_macs(dim: int, depth: int, states: int = STATES) -> int:
    return L * dim + depth * L * dim * (8 * states + 1 + dim) + 10 * dim


def eigen_init(h: int, n: int, g: torch.Generator, init: str = "lru", r_min: float = R_MIN, r_max: float = R_MAX,
               max_phase: float = MAX_PHASE):
    """(nu, theta), each (h, n), with lam = exp(-exp(nu) + i exp(theta)).
    lru (Orvieto et al. 2023): |lam|^2 uniform in [r_min^2, r_max^2], phase uniform in [0, max_phase].
    s4d (S4D-Lin, Gu et al. 2022): lam = exp(dt A_n), A_n = -1/2 + i pi n (n = 0..N-1), one step dt per
    channel log-uniform in [1e-3, 1e-1] (zero-order hold): |lam| = exp(-dt / 2), phase pi n dt."""
    if init == "lru":
        mod = torch.rand(h, n, generator=g) * (r_max ** 2 - r_min ** 2) + r_min ** 2           # |lam|^2 uniform
        phase = torch.rand(h, n, generator=g) * max_phase
        return torch.log(-0.5 * torch.log(mod)), torch.log(phase.clamp_min(1e-4))
    dt = torch.exp(torch.rand(h, 1, generator=g) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = dt.expand(h, n)
    phase = math.pi * torch.arange(n, dtype=torch.float32) * dt
    return torch.log(0.5 * dt), torch.log(phase.clamp_min(1e-4))


def recurrent_form(lam, bg, c, d, v):
    """lam, bg (= gamma B), c: (H, N) complex; d (H,); v (B, H, L) real -> y (B, H, L):
    x_k = lam x_(k-1) + bg v_k (x_(-1) = 0), y_k = Re(sum_n c x_k) + d v_k."""
    x = torch.zeros(v.shape[0], *lam.shape, dtype=lam.dtype, device=v.device)
    out = []
    for k in range(v.shape[-1]):
        x = lam * x + bg * v[..., k, None]
        out.append((c * x).real.sum(-1))
    return torch.stack(out, -1) + d[:, None] * v


def kernel(lam, bg, c, n: int = L) -> torch.Tensor:
    """(H, n) real: K_j = Re(sum_n c bg lam^j), j = 0..n-1, the response of the recurrence to a
    unit impulse; in real arithmetic, lam^j = |lam|^j (cos j phi + i sin j phi)."""
    j = torch.arange(n, dtype=torch.float32, device=lam.device)
    cb = c * bg
    jphi = lam.angle()[..., None] * j                                      # (H, N, n)
    mag = torch.exp(torch.log(lam.abs())[..., None] * j)
    return (mag * (cb.real[..., None] * torch.cos(jphi) - cb.imag[..., None] * torch.sin(jphi))).sum(1)


def parallel_form(lam, bg, c, d, v):
    """The same y as a causal convolution of each channel with its kernel, by real FFTs
    zero-padded to 2 L (no wrap-around)."""
    n = v.shape[-1]
    f = torch.fft.rfft(v, n=2 * n) * torch.fft.rfft(kernel(lam, bg, c, n), n=2 * n)
    return torch.fft.irfft(f, n=2 * n)[..., :n] + d[:, None] * v


class SSMNet(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 24, depth: int = 2, dropout: float = 0.0, permuted: bool = False,
                 states: int = STATES, init: str = "s4d", r_min: float = R_MIN, r_max: float = R_MAX,
                 max_phase: float = MAX_PHASE, enc_bias: bool = False, final_norm: bool = False,
                 a_lr: float = 1.0, glu: bool = False):
        super().__init__()
        if dim < 1 or depth < 1 or states < 1:
            raise UserError(f"ssm needs model.dim >= 1 and model.depth >= 1, not {dim} and {depth}")
        if init not in ("lru", "s4d") or not 0.0 < r_min < r_max < 1.0 or not 0.0 < a_lr <= 1.0:
            raise UserError(f"ssm: init lru|s4d, 0 < r_min < r_max < 1, 0 < a_lr <= 1; not {init}, {r_min}, "
                            f"{r_max}, {a_lr}")
        self.dim, self.depth, self.states, self.dropout, self.permuted = dim, depth, states, dropout, permuted
        self.final_norm, self.a_scale, self.glu = final_norm, float(a_lr), glu
        self.dropout_units = dim
        self.recurrent = False    # True: the loop over steps instead of the FFT convolution (tests)
        g = torch.Generator().manual_seed(int(seed))
        h, n = dim, states

        def uni(shape, bound):
            return nn.Parameter((torch.rand(shape, generator=g) * 2.0 - 1.0) * bound)

        def normal(shape, std):
            return nn.Parameter(torch.randn(shape, generator=g) * std)

        self.enc_w = uni((h,), 1.0)
        self.enc_b = uni((h,), 1.0) if enc_bias else nn.Parameter(torch.zeros(h))
        for i in range(depth):
            nu, theta = eigen_init(h, n, g, init, r_min, r_max, max_phase)
            p = {"ln_w": nn.Parameter(torch.ones(h)), "ln_b": nn.Parameter(torch.zeros(h)),
                 "nu": nn.Parameter(nu / self.a_scale), "theta": nn.Parameter(theta / self.a_scale),
                 "b_re": normal((h, n), 1 / math.sqrt(2)), "b_im": normal((h, n), 1 / math.sqrt(2)),
                 "c_re": normal((h, n), 1 / math.sqrt(2 * n)), "c_im": normal((h, n), 1 / math.sqrt(2 * n)),
                 "d": normal((h,), 1.0), "mix_w": uni(((1 + glu) * h, h), 1 / math.sqrt(h)),
                 "mix_b": nn.Parameter(torch.zeros((1 + glu) * h))}
            for k, v in p.items():
                setattr(self, f"l{i}_{k}", v)
        if final_norm:
            self.out_ln_w, self.out_ln_b = nn.Parameter(torch.ones(h)), nn.Parameter(torch.zeros(h))
        self.head_w, self.head_b = uni((10, h), 1 / math.sqrt(h)), nn.Parameter(torch.zeros(10))
        self.register_buffer("perm", permutation(), persistent=False)

    def ssm(self, i: int):
        """Layer i's (lam, gamma B, C, D)."""
        p = lambda k: getattr(self, f"l{i}_{k}")  # noqa: E731
        nu, theta = p("nu") * self.a_scale, p("theta") * self.a_scale
        lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(theta)))
        gamma = torch.sqrt(1.0 - torch.exp(-2.0 * torch.exp(nu)))                         # sqrt(1 - |lam|^2)
        return lam, torch.complex(p("b_re"), p("b_im")) * gamma, torch.complex(p("c_re"), p("c_im")), p("d")

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """(B, H, L) -> (B, H, L): one residual SSM block (channels first: the FFTs run along the
        contiguous step axis)."""
        p = lambda k: getattr(self, f"l{i}_{k}")  # noqa: E731
        mu = h.mean(1, keepdim=True)
        var = ((h - mu) ** 2).mean(1, keepdim=True)
        v = (h - mu) * torch.rsqrt(var + 1e-5) * p("ln_w")[:, None] + p("ln_b")[:, None]   # LayerNorm over H
        y = (recurrent_form if self.recurrent else parallel_form)(*self.ssm(i), v)
        z = p("mix_w") @ F.gelu(y) + p("mix_b")[:, None]
        return h + (F.glu(z, dim=1) if self.glu else z)

    def forward(self, x, keep=None):  # x (B, 1, 16, 16) in [-1, 1]; keep (B, dim) dropout mask
        u = x.reshape(x.shape[0], L)
        if self.permuted:
            u = u[:, self.perm]
        h = u.unsqueeze(1) * self.enc_w[:, None] + self.enc_b[:, None]        # (B, H, L)
        for i in range(self.depth):
            h = self.layer(i, h)
        z = h.mean(-1)                                                        # (B, H)
        if self.final_norm:
            z = F.layer_norm(z, (self.dim,), self.out_ln_w, self.out_ln_b)
        if keep is not None:
            z = z * keep.to(z.dtype) * (1.0 / (1.0 - self.dropout))
        elif self.dropout > 0:
            z = F.dropout(z, self.dropout, self.training)
        return F.linear(z, self.head_w, self.head_b)
