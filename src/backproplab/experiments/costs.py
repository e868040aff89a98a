"""Compute accounting: training FLOPs and what a run would have cost in 1989.

The paper: 167,693 presentations of a 63,660-MAC net took 3 days on a SUN-4/260.
A training step costs about 3 forward passes (forward, backward to the inputs,
backward to the weights): 3 x 2 x MACs FLOPs.
"""
from ..models.net1989 import MACS as NET1989_MACS

SUN4_DAYS, SUN4_PRESENTATIONS, SUN4_MACS = 3.0, 167_693, 63_660


def model_macs(cfg_model) -> int:
    if cfg_model.name == "net1989":
        return NET1989_MACS
    from ..models.vit import vit_macs_from_cfg
    return vit_macs_from_cfg(cfg_model)


def training_flops(cfg, n_train: int) -> float:
    """FLOPs to train one replica: passes x examples x 6 x MACs."""
    return float(cfg.train.passes) * n_train * 6.0 * model_macs(cfg.model)


def cost_1989_days(cfg, n_train: int) -> float:
    macs = float(cfg.train.passes) * n_train * model_macs(cfg.model)
    return SUN4_DAYS * macs / (SUN4_PRESENTATIONS * SUN4_MACS)
