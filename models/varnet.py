"""The fastMRI End-to-End Variational Network (Sriram et al. 2020) on multicoil k-space.

Module tree, state_dict keys and outputs match ``fastmri.models.VarNet``, so public fastMRI VarNet
weights load with ``load_state_dict(strict=True)`` (or :func:`load_pretrained_varnet` for a file).
Its U-Nets are :class:`models.unet.Unet` with fastMRI's parameter-free instance norm.

Complex data are torch complex tensors here, not fastMRI's trailing-2 real layout:

- ``masked_kspace``: complex ``(B, C, H, W)`` (C coils);
- ``mask``: bool ``(B, 1, 1, W)``, the sampled k-space columns (fastMRI's ``(B, 1, 1, W, 1)``
  without its last dim);
- ``num_low_frequencies``: the width of the fully sampled centre band (ACS lines) of each sample:
  None, an int, or an integer tensor ``(B,)``; an entry 0 (or None) derives it from the mask as
  fastMRI does. fastMRI's VarNet accepts only an int or a one-element tensor (a ``(B,)`` tensor with
  B > 1 fails on ``nlf == 0``); here every sample has its own band.
- output: the root-sum-of-squares image, real ``(B, H, W)`` at the full k-space size (not cropped).
"""

import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from data.transforms import fft2c, ifft2c, rss
from models.unet import Unet, _architecture, _read_checkpoint, key_mismatch, load_fastmri_part
from utils.errors import CheckpointError

# The command-line flag (options.py) that sets each VarNet constructor argument.
FLAGS = {
    "num_cascades": "--num_cascades",
    "chans": "--chans",
    "pools": "--pools",
    "sens_chans": "--sens_chans",
    "sens_pools": "--sens_pools",
}
SENS_UNET_PREFIX = "sens_net.norm_unet.unet."
CASCADE_UNET_PREFIX = "cascades.{}.model.unet."


class NormUnet(nn.Module):
    """A U-Net on complex images, run on their real and imaginary parts as channels.

    The input is normalised per sample (one mean and unbiased std over all real parts, one over
    all imaginary parts), zero-padded to a multiple of 16 in H and W, passed through the U-Net,
    then unpadded and unnormalised. Maps complex ``(B, c, H, W)`` to complex ``(B, c, H, W)``
    with ``c = in_chans // 2``.
    """

    def __init__(
        self, chans: int, num_pools: int, in_chans: int = 2, out_chans: int = 2, drop_prob: float = 0.0,
        norm: str = "instance",
    ):
        """
        Args:
            chans: channels of the U-Net's first level.
            num_pools: U-Net down-sampling levels.
            in_chans, out_chans: real channels of the U-Net (twice the complex channels).
            drop_prob: Dropout2d probability in the U-Net.
            norm: the U-Net's normalisation (`models.unet.make_norm`); "instance" is fastMRI's and
                adds no parameters, the others add the ones FedBN keeps local.
        """
        super().__init__()
        self.unet = Unet(
            in_chans=in_chans, out_chans=out_chans, chans=chans, num_pool_layers=num_pools, drop_prob=drop_prob,
            norm=norm,
        )

    def forward(self, image: torch.Tensor, *style: torch.Tensor) -> torch.Tensor:
        """Complex ``(B, c, H, W)`` -> complex ``(B, c, H, W)``; ``style`` goes on to the U-Net (a
        `models.personalized_unet.StyledUnet`'s latent)."""
        b, c, h, w = image.shape
        # Channels [re_0 .. re_{c-1}, im_0 .. im_{c-1}], as fastMRI's complex_to_chan_dim.
        x = torch.view_as_real(image).permute(0, 4, 1, 2, 3).reshape(b, 2 * c, h, w)

        grouped = x.view(b, 2, -1)
        mean = grouped.mean(dim=2).view(b, 2, 1, 1)
        std = grouped.std(dim=2).view(b, 2, 1, 1)
        x = ((x.view(b, 2, c, h, w) - mean.unsqueeze(2)) / std.unsqueeze(2)).view(b, 2 * c, h, w)

        h_mult, w_mult = ((h - 1) | 15) + 1, ((w - 1) | 15) + 1
        h_pad = (math.floor((h_mult - h) / 2), math.ceil((h_mult - h) / 2))
        w_pad = (math.floor((w_mult - w) / 2), math.ceil((w_mult - w) / 2))
        x = self.unet(F.pad(x, [*w_pad, *h_pad]), *style)
        x = x[..., h_pad[0] : h_mult - h_pad[1], w_pad[0] : w_mult - w_pad[1]]

        out_c = x.shape[1] // 2
        x = x.unflatten(1, (2, out_c)) * std.unsqueeze(2) + mean.unsqueeze(2)
        return torch.view_as_complex(x.permute(0, 2, 3, 4, 1).contiguous())


def acs_columns(mask: torch.Tensor, num_low_frequencies: int | torch.Tensor | None) -> torch.Tensor:
    """The fully sampled centre band of every sample, as a column mask.

    Args:
        mask: bool ``(B, 1, 1, W)`` sampled columns.
        num_low_frequencies: band width per sample: None, an int, or an integer tensor ``(B,)``
            (or one element for all). Where it is 0 (or None) the width is derived from the mask as
            fastMRI does: twice the distance from the centre column ``W // 2`` to the nearer
            unsampled column, at least 1.

    Returns:
        bool ``(B, 1, 1, W)``: True on columns ``[pad, pad + width)``, ``pad = (W - width + 1) // 2``.
    """
    batch, width = mask.shape[0], mask.shape[-1]
    if num_low_frequencies is None:
        given = torch.zeros(batch, dtype=torch.long, device=mask.device)
    else:
        given = torch.as_tensor(num_low_frequencies, device=mask.device).to(torch.long).reshape(-1)
        given = given.expand(batch)
    band = given
    if bool((given == 0).any()):
        sampled = mask[:, 0, 0, :].to(torch.int8)
        centre = width // 2
        # argmin finds the first unsampled column on each side of the centre.
        left = torch.argmin(sampled[:, :centre].flip(1), dim=1)
        right = torch.argmin(sampled[:, centre:], dim=1)
        derived = torch.clamp(2 * torch.minimum(left, right), min=1)
        band = torch.where(given == 0, derived, given)
    pad = (width - band + 1) // 2
    columns = torch.arange(width, device=mask.device)
    keep = (columns >= pad[:, None]) & (columns < (pad + band)[:, None])
    return keep.view(batch, 1, 1, width)


class SensitivityModel(nn.Module):
    """Coil sensitivity maps estimated from the ACS lines.

    The k-space outside the centre band is zeroed (``mask_center``), each coil image goes through
    a :class:`NormUnet` on its own, and the maps are divided by their root-sum-of-squares over the
    coils. Maps complex ``(B, C, H, W)`` k-space to complex ``(B, C, H, W)`` maps.
    """

    def __init__(
        self,
        chans: int,
        num_pools: int,
        in_chans: int = 2,
        out_chans: int = 2,
        drop_prob: float = 0.0,
        mask_center: bool = True,
        norm: str = "instance",
    ):
        """
        Args:
            chans, num_pools: the :class:`NormUnet`'s first-level channels and levels.
            in_chans, out_chans, drop_prob, norm: as :class:`NormUnet`.
            mask_center: keep only the ACS lines before estimating the maps.
        """
        super().__init__()
        self.mask_center = mask_center
        self.norm_unet = NormUnet(chans, num_pools, in_chans=in_chans, out_chans=out_chans, drop_prob=drop_prob,
                                  norm=norm)

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Complex ``(B, C, H, W)`` k-space, bool ``(B, 1, 1, W)`` mask -> complex ``(B, C, H, W)``."""
        if self.mask_center:
            masked_kspace = torch.where(acs_columns(mask, num_low_frequencies), masked_kspace, 0)
        b, c, h, w = masked_kspace.shape
        images = ifft2c(masked_kspace).reshape(b * c, 1, h, w)
        maps = self.norm_unet(images).reshape(b, c, h, w)
        norm = rss(maps, dim=1).unsqueeze(1).unsqueeze(-1)
        return torch.view_as_complex(torch.view_as_real(maps) / norm)


class VarNetBlock(nn.Module):
    """One cascade: a soft data-consistency step minus a regulariser applied in the coil-combined image.

    ``k - where(mask, k - k0, 0) * dc_weight - E(model(R(k)))`` with ``R`` the sensitivity-weighted
    coil combination of the images and ``E`` its adjoint (expand to coils, FFT).
    """

    def __init__(self, model: nn.Module):
        """
        Args:
            model: complex ``(B, 1, H, W)`` -> complex ``(B, 1, H, W)`` regulariser.
        """
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.ones(1))

    @staticmethod
    def sens_expand(image: torch.Tensor, sens_maps: torch.Tensor) -> torch.Tensor:
        """Complex ``(B, 1, H, W)`` image -> complex ``(B, C, H, W)`` coil k-space."""
        return fft2c(image * sens_maps)

    @staticmethod
    def sens_reduce(kspace: torch.Tensor, sens_maps: torch.Tensor) -> torch.Tensor:
        """Complex ``(B, C, H, W)`` coil k-space -> complex ``(B, 1, H, W)`` combined image."""
        return (ifft2c(kspace) * sens_maps.conj()).sum(dim=1, keepdim=True)

    def forward(
        self,
        current_kspace: torch.Tensor,
        ref_kspace: torch.Tensor,
        mask: torch.Tensor,
        sens_maps: torch.Tensor,
        *style: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            current_kspace: complex ``(B, C, H, W)``, the previous cascade's k-space.
            ref_kspace: complex ``(B, C, H, W)``, the measured (masked) k-space.
            mask: bool ``(B, 1, 1, W)``.
            sens_maps: complex ``(B, C, H, W)``.
            style: what the regulariser takes besides the image (a style latent), if anything.

        Returns:
            complex ``(B, C, H, W)``.
        """
        soft_dc = torch.where(mask, current_kspace - ref_kspace, 0) * self.dc_weight
        model_term = self.sens_expand(self.model(self.sens_reduce(current_kspace, sens_maps), *style), sens_maps)
        return current_kspace - soft_dc - model_term


class VarNet(nn.Module):
    """E2E-VarNet: sensitivity maps from the ACS lines, then ``num_cascades`` :class:`VarNetBlock`
    with :class:`NormUnet` regularisers, then the RSS image. See the module docstring for shapes."""

    def __init__(
        self,
        num_cascades: int = 12,
        sens_chans: int = 8,
        sens_pools: int = 4,
        chans: int = 18,
        pools: int = 4,
        mask_center: bool = True,
        norm: str = "instance",
    ):
        """
        Args:
            num_cascades: number of cascades (fastMRI's paper model: 12).
            sens_chans, sens_pools: first-level channels and levels of the sensitivity U-Net.
            chans, pools: first-level channels and levels of each cascade's U-Net.
            mask_center: estimate the sensitivities from the ACS lines only.
            norm: every U-Net's normalisation (:class:`NormUnet`); "instance" keeps fastMRI's keys.
        """
        super().__init__()
        self.num_cascades = num_cascades
        self.sens_chans, self.sens_pools = sens_chans, sens_pools
        self.chans, self.pools = chans, pools
        self.sens_net = SensitivityModel(chans=sens_chans, num_pools=sens_pools, mask_center=mask_center,
                                         norm=norm)
        self.cascades = nn.ModuleList([VarNetBlock(NormUnet(chans, pools, norm=norm)) for _ in range(num_cascades)])

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | torch.Tensor | None = None,
        *style: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            masked_kspace: complex ``(B, C, H, W)``.
            mask: bool ``(B, 1, 1, W)``.
            num_low_frequencies: ACS width per sample, see :func:`acs_columns`.
            style: what every cascade's regulariser takes besides the image (`VarNetBlock`), if anything.

        Returns:
            real ``(B, H, W)``: RSS over the coils of the final k-space's images.
        """
        sens_maps = self.sens_net(masked_kspace, mask, num_low_frequencies)
        kspace_pred = masked_kspace
        for cascade in self.cascades:
            kspace_pred = cascade(kspace_pred, masked_kspace, mask, sens_maps, *style)
        return rss(ifft2c(kspace_pred), dim=1)

    def fastmri_keys(self) -> list[str]:
        """The state_dict keys that fastMRI's VarNet has: all of them. A subclass that adds blocks
        leaves those out; `load_pretrained_varnet` fills these keys and the added blocks keep their init."""
        return list(self.state_dict())


def _unet_part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, object] | None:
    """The U-Net constructor arguments of the keys under ``prefix``; None if they are no U-Net."""
    return _architecture({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def _varnet_architecture(state: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """The VarNet constructor arguments a fastMRI-format state_dict was saved from; None if not a VarNet."""
    cascades = {int(m.group(1)) for key in state if (m := re.match(r"cascades\.(\d+)\.", key))}
    sens = _unet_part(state, SENS_UNET_PREFIX)
    cascade = _unet_part(state, CASCADE_UNET_PREFIX.format(0)) if cascades else None
    if sens is None or (cascades and cascade is None):
        return None
    found = {"num_cascades": len(cascades), "sens_chans": sens["chans"], "sens_pools": sens["num_pool_layers"]}
    if cascade is not None:
        found.update(chans=cascade["chans"], pools=cascade["num_pool_layers"])
    return found


def pretrained_varnet_architecture(path: str | Path) -> dict[str, int] | None:
    """`_varnet_architecture` of the weights in ``path``; None when the file is unreadable or holds
    no VarNet (`load_pretrained_varnet` then says why)."""
    try:
        return _varnet_architecture(_read_checkpoint(Path(path), prefix="varnet."))
    except CheckpointError:
        return None


def load_pretrained_varnet(model: VarNet, path: str | Path) -> None:
    """Load fastMRI-format VarNet weights from ``path`` into ``model`` (strictly: all keys, all
    shapes; a personalised model's added blocks, outside `VarNet.fastmri_keys`, keep their init).

    The file is read with ``torch.load(weights_only=True)`` and may hold a bare
    ``fastmri.models.VarNet`` state_dict or a Lightning checkpoint of fastMRI's VarNetModule (a
    dict with the state_dict under "state_dict", keys prefixed "varnet."; its SSIM loss buffer
    "loss.w" is ignored).

    Raises:
        CheckpointError: one line naming the file: unreadable, not a state_dict, refused by
            weights-only loading, U-Net weights, or VarNet weights of another size (with the flags
            that match them).
    """
    path = Path(path)
    state = _read_checkpoint(path, prefix="varnet.")
    refused = load_fastmri_part(model, state)
    if refused is None:
        return
    expected, mismatched = refused

    found = _varnet_architecture(state)
    ours = _varnet_architecture(expected)
    if found is not None and ours is not None:
        diffs = [name for name in FLAGS if found.get(name) is not None and found.get(name) != ours.get(name)]
        if diffs:
            theirs = ", ".join(f"{name}={found[name]}" for name in diffs)
            mine = ", ".join(f"{name}={ours.get(name)}" for name in diffs)
            flags = " ".join(f"{FLAGS[name]} {found[name]}" for name in diffs)
            raise CheckpointError(
                f"{path}: weights are for a VarNet with {theirs}, this model has {mine}; run with {flags}"
            )
    if found is None and _architecture(state) is not None:
        raise CheckpointError(f"{path}: holds U-Net weights, not VarNet weights; load them with --model unet")
    raise key_mismatch(path, state, expected, mismatched, "VarNet")
