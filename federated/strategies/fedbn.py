"""FedBN (Li et al., ICLR 2021): the normalisation layers -- their affine parameters and running
statistics -- stay with each client; every other weight is averaged. Each client is evaluated with
its own normalisation layers.

The layers are found by module type, so any model built by `build_model` works. fastMRI's
parameter-free InstanceNorm leaves nothing to keep local: FedBN needs `--norm instance_affine` or
`--norm batch`.
"""
from __future__ import annotations

import argparse

from torch import nn

from federated.strategies.base import Strategy
from utils.errors import UserError

# _NormBase is the common base of every BatchNorm and InstanceNorm variant.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module) -> set[str]:
    """state_dict keys (parameters and buffers) of the normalisation layers of `model`."""
    return {f"{name}.{key}" for name, module in model.named_modules() if isinstance(module, NORM_TYPES)
            for key in module.state_dict()}


class FedBN(Strategy):
    name = "fedbn"
    summary = "FedBN: normalisation layers stay with each client, everything else is averaged"
    personalized = True

    def __init__(self, opts: argparse.Namespace):
        super().__init__(opts)
        # From a model built now, so that a --norm without parameters fails before any data is read.
        self.local_keys = norm_keys(self.build_model([]))
        if not self.local_keys:
            raise UserError("--strategy fedbn needs a U-Net norm with parameters: "
                            "add --norm instance_affine or --norm batch")

    def is_shared(self, key: str) -> bool:
        return key not in self.local_keys
