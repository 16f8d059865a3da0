"""FL-MRCM's latent discriminator: tells a source site's U-Net latents from the target site's."""

import torch
from torch import nn
from torch.nn import functional as F


def pool_latent(latent: torch.Tensor) -> torch.Tensor:
    """FL-MRCM's latent vector: the bottleneck output average-pooled to 2x2 and flattened.

    Args:
        latent: U-Net bottleneck output, (B, C, h, w) with h, w >= 1.

    Returns:
        (B, 4 * C), laid out channel-major (C=512 at chans 32 gives 2048 values).
    """
    return F.adaptive_avg_pool2d(latent, output_size=2).flatten(start_dim=1)


class LatentDiscriminator(nn.Module):
    """Linear(in_features, hidden), LeakyReLU(0.2), Linear(hidden, 2): logits for the two domains."""

    def __init__(self, in_features: int = 2048, hidden: int = 256):
        """
        Args:
            in_features: length of the pooled latent vector, ``4 * Unet.latent_channels``.
            hidden: width of the hidden layer.
        """
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(negative_slope=0.2),
            nn.Linear(hidden, 2),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_features) pooled latents -> (B, 2) domain logits."""
        return self.layers(features)
