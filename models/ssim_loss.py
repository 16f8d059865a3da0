"""The SSIM training loss of fastMRI's VarNet (``fastmri.SSIMLoss``): 1 - mean SSIM over a box window.

This is the training loss, not the evaluation SSIM: it uses a uniform ``win_size`` x ``win_size``
window without padding ("valid" positions only) and the unbiased (co)variances, where evaluation
(``utils.metrics``, as ``fastmri.evaluate``) uses scikit-image's SSIM per slice.
"""

import torch
from torch import nn
from torch.nn import functional as F


class SSIMLoss(nn.Module):
    """``1 - SSIM(output, target)`` with the constants scaled by each sample's data range."""

    def __init__(self, win_size: int = 7, k1: float = 0.01, k2: float = 0.03):
        """
        Args:
            win_size: side of the uniform window.
            k1, k2: SSIM stabilising constants, ``C1 = (k1 * data_range)**2``, ``C2 = (k2 * data_range)**2``.
        """
        super().__init__()
        self.win_size = win_size
        self.k1, self.k2 = k1, k2
        # A persistent buffer, as fastMRI's: its Lightning checkpoints hold it as "loss.w".
        self.register_buffer("w", torch.ones(1, 1, win_size, win_size) / win_size**2)
        num_points = win_size**2
        self.cov_norm = num_points / (num_points - 1)

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor, reduced: bool = True
    ) -> torch.Tensor:
        """
        Args:
            output, target: real ``(B, 1, H, W)``.
            data_range: ``(B,)`` maximum value of each sample's target volume.
            reduced: return the mean over every window position of every sample (a 0-d tensor)
                instead of the per-position map ``(B, 1, H - win_size + 1, W - win_size + 1)``.

        Returns:
            ``1 - SSIM``: 0-d, or the per-position map when not ``reduced``.
        """
        data_range = data_range[:, None, None, None]
        c1 = (self.k1 * data_range) ** 2
        c2 = (self.k2 * data_range) ** 2
        ux = F.conv2d(output, self.w)
        uy = F.conv2d(target, self.w)
        uxx = F.conv2d(output * output, self.w)
        uyy = F.conv2d(target * target, self.w)
        uxy = F.conv2d(output * target, self.w)
        vx = self.cov_norm * (uxx - ux * ux)
        vy = self.cov_norm * (uyy - uy * uy)
        vxy = self.cov_norm * (uxy - ux * uy)
        numerator = (2 * ux * uy + c1) * (2 * vxy + c2)
        denominator = (ux**2 + uy**2 + c1) * (vx + vy + c2)
        ssim = numerator / denominator
        return 1 - ssim.mean() if reduced else 1 - ssim
