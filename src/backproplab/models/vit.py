"""A micro-ViT for 16x16 digits, matched to the 1989 net in parameters and multiply-adds.

Why patch 8 and two register tokens: a linear layer costs T multiply-adds per weight
when T tokens pass through it, and the 1989 net does 63,660 / 9,760 = 6.5 MACs per
parameter. Patch 4 gives 16 tokens (about 16 MACs per parameter, 2.5x too many);
patch 8 gives 4 image tokens, and a class token plus two learned register tokens
(Darcet et al. 2024, "Vision Transformers Need Registers") bring T to 7. With the
defaults (dim 18, depth 2, heads 2, patch 8, MLP ratio 4): 9,766 parameters (+0.1%) and
62,748 multiply-adds (-1.4%).

Layout: pad to a multiple of the patch with -1 (blank paper), cut into patches,
linear patch embedding + learned position embedding per image token, prepend
[cls, reg, reg], `depth` pre-LayerNorm blocks (multi-head attention, MLP with the
config's activation), LayerNorm of the class token, dropout there (dim units), a
linear head to 10 outputs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .net1989 import activation, count_params  # noqa: F401  (count_params re-exported)

MLP_RATIO = 4       # hidden width of the MLP = MLP_RATIO * dim
REGISTERS = 2       # learned tokens besides the class token, dropped before the head
POS_STD = 0.02      # std of the initial position / class / register embeddings
SIDE = 16           # input is (B, 1, 16, 16)


def grid(patch: int) -> int:
    return math.ceil(SIDE / patch)  # patches per side after padding with -1


def vit_macs(dim: int, depth: int, heads: int, patch: int, mlp_ratio: int = MLP_RATIO,
             extra_tokens: int = 1 + REGISTERS) -> int:
    """Multiply-adds of one forward pass of one image: matrix products only.

    Counted: patch embedding, q/k/v, q.k^T, attention x v, output projection, both MLP
    layers, head. Not counted (as for the 1989 net's 63,660): bias adds, LayerNorm,
    softmax, the activation, position-embedding adds. `heads` does not change the count
    (H heads of width dim/H do the work of one head of width dim).
    """
    n = grid(patch) ** 2
    t = n + extra_tokens
    embed = n * patch * patch * dim
    block = t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * mlp_ratio * dim
    return embed + depth * block + 10 * dim


def vit_macs_from_cfg(cfg_model) -> int:
    return vit_macs(cfg_model.dim, cfg_model.depth, cfg_model.heads, cfg_model.patch)


def vit_params(dim: int, depth: int, patch: int, mlp_ratio: int = MLP_RATIO, registers: int = REGISTERS) -> int:
    n, h = grid(patch) ** 2, mlp_ratio * dim
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * h + h) + (h * dim + dim)
    return (patch * patch + 1) * dim + n * dim + (1 + registers) * dim + depth * block + 2 * dim + 10 * dim + 10


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). x (B, T, dim)."""

    def __init__(self, dim: int, heads: int, hidden: int, act):
        super().__init__()
        self.heads, self.act = heads, act
        self.ln1_w, self.ln1_b = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.qkv_w, self.qkv_b = nn.Parameter(torch.empty(3 * dim, dim)), nn.Parameter(torch.zeros(3 * dim))
        self.proj_w, self.proj_b = nn.Parameter(torch.empty(dim, dim)), nn.Parameter(torch.zeros(dim))
        self.ln2_w, self.ln2_b = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.fc1_w, self.fc1_b = nn.Parameter(torch.empty(hidden, dim)), nn.Parameter(torch.zeros(hidden))
        self.fc2_w, self.fc2_b = nn.Parameter(torch.empty(dim, hidden)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        B, T, D = x.shape
        H = self.heads
        h = F.layer_norm(x, (D,), self.ln1_w, self.ln1_b)
        qkv = F.linear(h, self.qkv_w, self.qkv_b).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                  # (B, H, T, D/H)
        att = torch.softmax((q @ k.transpose(-2, -1)) * (D // H) ** -0.5, dim=-1)  # (B, H, T, T)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)                    # (B, T, D)
        x = x + F.linear(y, self.proj_w, self.proj_b)
        h = F.layer_norm(x, (D,), self.ln2_w, self.ln2_b)
        return x + F.linear(self.act(F.linear(h, self.fc1_w, self.fc1_b)), self.fc2_w, self.fc2_b)


class ViT(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 18, depth: int = 2, heads: int = 2, patch: int = 8,
                 act: str = "relu", out_act: str = "none", dropout: float = 0.0, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        if dim % heads:
            raise UserError(f"model.dim={dim} must be a multiple of model.heads={heads}")
        self.dim, self.patch, self.out_act, self.dropout = dim, patch, out_act, dropout
        self.dropout_units = dim  # keep masks are (B, dim): dropout on the pooled class token
        self.act = activation(act)
        n = grid(patch) ** 2
        self.patch_w = nn.Parameter(torch.empty(dim, patch * patch))  # (dim, p*p)
        self.patch_b = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.empty(n, dim))                    # image tokens only
        self.tokens = nn.Parameter(torch.empty(1 + REGISTERS, dim))     # [cls, registers...]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio * dim, self.act) for _ in range(depth))
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.head_w, self.head_b = nn.Parameter(torch.empty(10, dim)), nn.Parameter(torch.zeros(10))
        self._init(seed)

    @torch.no_grad()
    def _init(self, seed):
        # Weights uniform in +-1/sqrt(fan_in) (torch's nn.Linear bound), biases 0, LayerNorm 1/0,
        # embeddings N(0, 0.02); drawn in named_parameters order from one generator.
        g = torch.Generator().manual_seed(int(seed))
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("pos", "tokens"):
                p.copy_(torch.randn(p.shape, generator=g) * POS_STD)
            elif leaf.endswith("_w") and not leaf.startswith("ln"):
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=g) * 2.0 - 1.0) * bound)

    def forward(self, x, keep=None):  # x (B, 1, 16, 16) in [-1, 1]; keep (B, dim) dropout mask
        B, p, g = x.shape[0], self.patch, grid(self.patch)
        pad = g * p - SIDE
        if pad:
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
        x = x.reshape(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, g * g, p * p)  # (B, N, p*p)
        x = F.linear(x, self.patch_w, self.patch_b) + self.pos                        # (B, N, dim)
        x = torch.cat([self.tokens.expand(B, -1, -1), x], dim=1)                      # (B, T, dim)
        for blk in self.blocks:
            x = blk(x)
        x = F.layer_norm(x[:, 0], (self.dim,), self.ln_w, self.ln_b)                  # (B, dim)
        if keep is not None:  # the caller's mask: shared random stream, exact resume
            x = x * keep.to(x.dtype) * (1.0 / (1.0 - self.dropout))
        elif self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        x = F.linear(x, self.head_w, self.head_b)                                     # (B, 10)
        return x if self.out_act == "none" else activation(self.out_act)(x)
