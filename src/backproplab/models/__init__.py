from .net1989 import (Net1989, PARAM_NAMES, PARAM_SHAPES, H2_TABLE, MACS, ACTIVATIONS, N_PARAMS,
                      LAYER_PARAMS, init_params, weights_sha256)

__all__ = ["Net1989", "PARAM_NAMES", "PARAM_SHAPES", "H2_TABLE", "MACS", "ACTIVATIONS", "N_PARAMS",
           "LAYER_PARAMS", "init_params", "weights_sha256"]
