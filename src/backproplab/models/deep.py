"""Deep residual stacks for the ReZero study (seed 004, SPEC section 3).

Two families on the 16x16 digits, each `depth` residual layers of one width:
  mlp   x (B, 256) -> Linear(256, W) -> depth x block(Linear(W, W)) -> Linear(W, 10)
  conv  x (B, 1, 16, 16) -> Conv 3x3 stride 2 (1 -> W) -> (B, W, 8, 8) -> depth x block(Conv 3x3 W -> W)
        -> flatten (B, 64 W) -> Linear(64 W, 10)

A block with branch f (one Linear or one 3x3 convolution) and g = relu:
  none        x + g(f(x))                 residual, no normalization
  batch       x + g(BN(f(x)))             BatchNorm on the branch (ResNet style)
  layer_pre   x + g(f(LN(x)))             LayerNorm before the branch (pre-LN Transformer)
  layer_post  LN(x + g(f(x)))             LayerNorm after the sum (the original Transformer)
  rezero      x + a * g(f(x)), a = 0      one scalar a per layer, initialized at 0 (Bachlechner et al. 2020)
For conv stacks LayerNorm normalizes each example over channels and positions (GroupNorm with
one group, per-channel gain and bias). Every layer keeps PyTorch's default initialization
(uniform in +-1/sqrt(fan_in)), the same for every variant, so only the block differs.

On the population engine (models/registry.py, model.name=deep): model.stack, model.depth,
model.width (0: DEFAULT_WIDTH of the stack) and model.norm pick the net; model.dropout drops
the head's inputs (W for mlp, 64 W for conv) with the caller's keep mask, as the other models do.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

NORMS = ("none", "batch", "layer_pre", "layer_post", "rezero")
KINDS = ("mlp", "conv")
DEFAULT_WIDTH = {"mlp": 64, "conv": 8}   # model.width=0 on the engine


def rezero_residual(x: torch.Tensor, branch: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The ReZero update x + a * F(x); a is a 0-d tensor (one scalar per layer)."""
    return x + a * branch


class Block(nn.Module):
    def __init__(self, kind: str, norm: str, width: int):
        super().__init__()
        self.kind, self.norm = kind, norm
        self.f = nn.Linear(width, width) if kind == "mlp" else nn.Conv2d(width, width, 3, padding=1)
        if norm == "batch":
            self.n = nn.BatchNorm1d(width) if kind == "mlp" else nn.BatchNorm2d(width)
        elif norm in ("layer_pre", "layer_post"):
            self.n = nn.LayerNorm(width) if kind == "mlp" else nn.GroupNorm(1, width)
        if norm == "rezero":
            self.a = nn.Parameter(torch.zeros(()))  # the residual weight, 0 at init: the block is the identity

    def forward(self, x):
        if self.norm == "none":
            return x + F.relu(self.f(x))
        if self.norm == "batch":
            return x + F.relu(self.n(self.f(x)))
        if self.norm == "layer_pre":
            return x + F.relu(self.f(self.n(x)))
        if self.norm == "layer_post":
            return self.n(x + F.relu(self.f(x)))
        return rezero_residual(x, F.relu(self.f(x)), self.a)


class DeepNet(nn.Module):
    def __init__(self, kind: str = "mlp", depth: int = 8, width: int = 64, norm: str = "rezero", seed: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        check(kind, depth, width, norm)
        self.kind, self.depth, self.width, self.norm, self.dropout = kind, depth, width, norm, float(dropout)
        g = torch.random.fork_rng(devices=[])  # seeded init without touching the caller's global stream
        with g:
            torch.manual_seed(int(seed))
            if kind == "mlp":
                self.stem = nn.Linear(256, width)
            else:
                self.stem = nn.Conv2d(1, width, 3, stride=2, padding=1)
            self.blocks = nn.ModuleList(Block(kind, norm, width) for _ in range(depth))
            self.head = nn.Linear(width if kind == "mlp" else 64 * width, 10)

    def forward(self, x, keep=None):  # x (B, 1, 16, 16) in [-1, 1]; keep (B, head_units) or None -> logits (B, 10)
        h = self.stem(x.reshape(len(x), 256) if self.kind == "mlp" else x)  # (B, W) or (B, W, 8, 8)
        for b in self.blocks:
            h = b(h)
        h = h.flatten(1)                                                     # (B, W) or (B, 64 W)
        if keep is not None:  # the caller's mask: shared random stream, exact resume
            h = h * keep.to(h.dtype) * (1.0 / (1.0 - self.dropout))
        return self.head(h)

    def residual_weights(self) -> list[float]:
        return [float(b.a.detach()) for b in self.blocks] if self.norm == "rezero" else []


def check(kind, depth, width, norm):
    if kind not in KINDS:
        raise UserError(f"unknown stack {kind!r}; choose {', '.join(KINDS)}")
    if norm not in NORMS:
        raise UserError(f"unknown normalization {norm!r}; choose {', '.join(NORMS)}")
    if not (1 <= int(depth) <= 1024) or not (1 <= int(width) <= 4096):
        raise UserError(f"depth {depth} and width {width} must be in 1..1024 and 1..4096")


def head_units(kind: str, width: int) -> int:
    """Inputs of the head: what model.dropout drops (the engine's keep masks are this wide)."""
    return width if kind == "mlp" else 64 * width


def stack_macs(kind: str, depth: int, width: int) -> int:
    """Multiply-adds of one forward pass of one image (weights only; norms and sums left out)."""
    if kind == "mlp":
        return 256 * width + depth * width * width + width * 10
    return 64 * 9 * width + depth * 64 * 9 * width * width + 64 * width * 10
