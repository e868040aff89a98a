"""Model families with one size knob, and what a run of one costs.

convnet: models/convnet.py (width 4 size, (size - 1) // 2 extra 3x3 layers).
vit:     models/vit.py micro-ViT with dim 6 (size + 1), depth 1 + size // 2, 2 heads, patch 8
         (size 2 is the repo's 1989-matched ViT: 9,766 parameters, 62,748 multiply-adds).

N is the parameter count. Training FLOPs per example count what torch.utils.flop_counter
counts for one forward and backward pass with a cross-entropy loss (matrix products and
convolutions, 2 FLOPs per multiply-add; bias adds, activations, LayerNorm and softmax
are not counted): forward 2 M, backward 4 M, less 2 M_first for the gradient with
respect to the input image, which is never formed (M: multiply-adds per image,
M_first: those of the layer that reads the image). Training compute of a run:
C = flops_per_example x examples seen. Evaluation is not counted in C.
"""
from dataclasses import dataclass

from ..errors import UserError
from ..models import convnet as cn
from ..models import vit as vt

VIT_HEADS, VIT_PATCH = 2, 8


def vit_shape(size: int) -> tuple[int, int]:
    """(dim, depth) of the micro-ViT family member `size`."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 64:
        raise UserError(f"vit size must be an integer from 1 to 64, not {size!r}")
    return 6 * (size + 1), 1 + size // 2


@dataclass(frozen=True)
class Member:
    family: str
    size: int
    params: int              # N
    macs: int                # multiply-adds of one forward pass of one image
    first_macs: int          # those of the layer that reads the image
    shape: dict              # human-readable architecture

    @property
    def train_flops(self) -> int:
        """FLOPs of one forward + backward pass of one example (see the module notes)."""
        return 6 * self.macs - 2 * self.first_macs

    def build(self, seed: int):
        if self.family == "convnet":
            return cn.ConvNet(seed, size=self.size)
        dim, depth = vit_shape(self.size)
        return vt.ViT(seed, dim=dim, depth=depth, heads=VIT_HEADS, patch=VIT_PATCH, act="relu", out_act="none")


def member(family: str, size: int) -> Member:
    if family == "convnet":
        w, extra = cn.shape(size)
        return Member("convnet", size, cn.conv_params(size), cn.conv_macs(size), cn.layer_macs(size)["c1"],
                      {"width": w, "depth": 3 + extra})
    if family == "vit":
        dim, depth = vit_shape(size)
        first = vt.grid(VIT_PATCH) ** 2 * VIT_PATCH ** 2 * dim        # the patch embedding
        return Member("vit", size, vt.vit_params(dim, depth, VIT_PATCH),
                      vt.vit_macs(dim, depth, VIT_HEADS, VIT_PATCH), first,
                      {"dim": dim, "depth": depth, "heads": VIT_HEADS, "patch": VIT_PATCH})
    raise UserError(f"unknown model family {family!r}; choose convnet or vit")


FAMILIES = ("convnet", "vit")
