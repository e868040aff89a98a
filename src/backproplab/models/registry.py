"""Model registry: name -> constructor from a ModelCfg and a seed.

Every model takes forward(x (B, 1, 16, 16), keep=None) -> (B, 10) (the convnet family also
(B, 1, r, r) at r = data.resolution: build_model(..., resolution=r)), where keep is a
(B, dropout_units(cfg)) boolean mask drawn by the training loop (shared random
streams, exact resume) and the model scales kept units by 1/(1-p).
"""
import torch.nn as nn

from ..errors import UserError
from .net1989 import N_PARAMS, MACS, Net1989
from .vit import ViT, vit_macs_from_cfg
from .convnet import ConvNet, conv_macs, layer_specs


def _net1989(m, seed):
    return Net1989(seed, act=m.act, out_act=m.out_act, dropout=m.dropout)


def _vit(m, seed):
    return ViT(seed, dim=m.dim, depth=m.depth, heads=m.heads, patch=m.patch, act=m.act,
               out_act=m.out_act, dropout=m.dropout)


def _convnet(m, seed, resolution=16):  # the scaling family: model.depth is its size knob, model.width and
    return ConvNet(seed, size=m.depth, dropout=m.dropout, block=m.block, width=m.width,  # model.block
                   resolution=resolution)                                               # (models/convnet.py)


def _ssm(m, seed):  # models/ssm.py: model.dim channels, model.depth layers, model.seq the pixel order
    from .ssm import SSMNet
    return SSMNet(seed, dim=m.dim, depth=m.depth, dropout=m.dropout, permuted=m.seq == "permuted")


def _deep(m, seed):  # models/deep.py: model.stack, model.depth residual layers of model.width (0: the stack's
    from .deep import DEFAULT_WIDTH, DeepNet  # default), model.norm the block variant
    return DeepNet(m.stack, m.depth, m.width or DEFAULT_WIDTH[m.stack], m.norm, seed, dropout=m.dropout)


MODELS = {"net1989": _net1989, "vit": _vit, "convnet": _convnet, "ssm": _ssm, "deep": _deep}


def list_models():
    return sorted(MODELS)


def _check_resolution(cfg_model, resolution):
    if resolution != 16 and cfg_model.name != "convnet":
        raise UserError(f"model.name={cfg_model.name} takes 16x16 inputs only, not data.resolution={resolution}")


def build_model(cfg_model, seed: int, resolution: int = 16) -> nn.Module:
    """resolution: the input side (data.resolution); only the convnet family takes other than 16."""
    if cfg_model.name not in MODELS:
        raise UserError(f"unknown model {cfg_model.name!r}; known: {', '.join(list_models())}")
    _check_resolution(cfg_model, resolution)
    if resolution != 16:
        return _convnet(cfg_model, int(seed), resolution)
    return MODELS[cfg_model.name](cfg_model, int(seed))


def dropout_units(cfg_model, resolution: int = 16) -> int:
    """Width of the keep masks the model takes: 192 H2 outputs for net1989, dim for the ViT."""
    _check_resolution(cfg_model, resolution)
    if cfg_model.name == "convnet":
        return layer_specs(cfg_model.depth, cfg_model.block, cfg_model.width, resolution)[-1]["cin"]
    if cfg_model.name == "ssm":
        return cfg_model.dim
    if cfg_model.name == "deep":
        from .deep import DEFAULT_WIDTH, head_units
        return head_units(cfg_model.stack, cfg_model.width or DEFAULT_WIDTH[cfg_model.stack])
    return cfg_model.dim if cfg_model.name == "vit" else 192


def model_macs(cfg_model, resolution: int = 16) -> int:
    """Multiply-adds of one forward pass of one image."""
    _check_resolution(cfg_model, resolution)
    if cfg_model.name == "vit":
        return vit_macs_from_cfg(cfg_model)
    if cfg_model.name == "convnet":
        return conv_macs(cfg_model.depth, cfg_model.block, cfg_model.width, resolution)
    if cfg_model.name == "ssm":
        from .ssm import ssm_macs
        return ssm_macs(cfg_model.dim, cfg_model.depth)
    if cfg_model.name == "deep":
        from .deep import DEFAULT_WIDTH, stack_macs
        return stack_macs(cfg_model.stack, cfg_model.depth, cfg_model.width or DEFAULT_WIDTH[cfg_model.stack])
    return MACS


REFERENCE = {"params": N_PARAMS, "macs": MACS}  # the 1989 net every model is compared with


def model_card(cfg_model, resolution: int = 16) -> dict:
    """Size of the model against the 1989 net: parameters, multiply-adds per image, ratios."""
    n = sum(p.numel() for p in build_model(cfg_model, 0, resolution).parameters())
    macs = model_macs(cfg_model, resolution)
    return {"model": cfg_model.name, "params": n, "macs": macs, "dropout_units": dropout_units(cfg_model, resolution),
            "params_vs_1989": n / REFERENCE["params"], "macs_vs_1989": macs / REFERENCE["macs"]}
