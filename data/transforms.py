"""From a k-space slice to a normalised U-Net sample, as fastMRI's ``UnetDataTransform`` does.

Complex data are torch (or numpy) complex tensors here, not fastMRI's trailing-2 real layout; the
mask functions still receive the trailing-2 shape so that their output matches fastMRI's.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from data.subsample import MaskFunc, Seed
from utils.errors import DataError, UserError

NORM_EPS = 1e-11
CLAMP = 6.0


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two dims of a complex ``(..., H, W)``."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    x = torch.fft.fft2(x, norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


def ifft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT over the last two dims of a complex ``(..., H, W)``."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    x = torch.fft.ifft2(x, norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


def fft2c_np(x: np.ndarray) -> np.ndarray:
    """``fft2c`` for numpy arrays ``(..., H, W)``; complex64 stays complex64."""
    x = np.fft.ifftshift(x, axes=(-2, -1))
    x = np.fft.fft2(x, norm="ortho")
    return np.fft.fftshift(x, axes=(-2, -1))


def ifft2c_np(x: np.ndarray) -> np.ndarray:
    """``ifft2c`` for numpy arrays ``(..., H, W)``; complex64 stays complex64."""
    x = np.fft.ifftshift(x, axes=(-2, -1))
    x = np.fft.ifft2(x, norm="ortho")
    return np.fft.fftshift(x, axes=(-2, -1))


def center_crop(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """View of the central ``shape = (h, w)`` region of the last two dims of ``x`` ``(..., H, W)``.

    When ``H - h`` (or ``W - w``) is odd the extra row (column) is dropped at the end.
    """
    height, width = x.shape[-2], x.shape[-1]
    if not (0 < shape[0] <= height and 0 < shape[1] <= width):
        raise ValueError(f"cannot centre-crop an image of size {(height, width)} to {tuple(shape)}")
    top = (height - shape[0]) // 2
    left = (width - shape[1]) // 2
    return x[..., top : top + shape[0], left : left + shape[1]]


def rss(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Root-sum-of-squares of the magnitudes along ``dim`` (the coil dim); real or complex input."""
    power = torch.view_as_real(x).square().sum(-1) if x.is_complex() else x.square()
    return power.sum(dim).sqrt()


class UnetSample(NamedTuple):
    """One normalised slice for the U-Net.

    Attributes:
        image: zero-filled magnitude image, normalised and clamped, float32 ``(h, w)``.
        target: target with the image's normalisation, float32 ``(h, w)``; ``tensor([0.])`` when the
            file has no target (challenge/test data), as in fastMRI.
        mean, std: 0-d tensors; ``image * std + mean`` is back on the original scale.
        fname: file name of the volume.
        slice_num: slice index in the volume.
        max_value: the volume's ``max`` attribute (target maximum), 0.0 when absent.
    """

    image: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    fname: str
    slice_num: int
    max_value: float


class UnetDataTransform:
    """Mask, zero-filled reconstruction, crop, magnitude (RSS over coils), normalisation."""

    def __init__(
        self,
        challenge: str,
        mask_func: MaskFunc | None = None,
        use_seed: bool = True,
        crop_size: tuple[int, int] | None = None,
    ):
        """
        Args:
            challenge: "singlecoil" (k-space ``(H, W)``) or "multicoil" (k-space ``(C, H, W)``).
            mask_func: undersampling mask; None keeps the file's own mask, or all of k-space.
            use_seed: seed the mask with the file name, so that every slice of a volume and every
                run gets the same mask (validation, test); False draws a fresh mask each call.
            crop_size: ``(h, w)`` of the output; None crops to the target's size, or to the file's
                ``recon_size`` when there is no target.
        """
        if challenge not in ("singlecoil", "multicoil"):
            raise UserError(f"--challenge must be 'singlecoil' or 'multicoil' (got {challenge!r})")
        self.challenge = challenge
        self.mask_func = mask_func
        self.use_seed = use_seed
        self.crop_size = crop_size

    def __call__(
        self,
        kspace: np.ndarray,
        mask: np.ndarray | None,
        target: np.ndarray | None,
        attrs: Mapping[str, Any],
        fname: str,
        slice_num: int,
        seed: Seed | None = None,
    ) -> UnetSample:
        """
        Args:
            kspace: complex64 ``(H, W)`` singlecoil or ``(C, H, W)`` multicoil.
            mask: the file's sampling mask ``(W,)``, used only when there is no ``mask_func``.
            target: float32 ``(h, w)`` reference image, or None.
            attrs: the file's attributes; reads ``max`` and, without target or crop size,
                ``recon_size``.
            fname: file name; the mask seed when ``use_seed``.
            slice_num: slice index.
            seed: mask seed overriding the file-name seed.
        """
        expected_ndim = 2 if self.challenge == "singlecoil" else 3
        if kspace.ndim != expected_ndim:
            raise DataError(
                f"{fname}: {self.challenge} k-space slices must have {expected_ndim} dims, "
                f"got shape {kspace.shape}"
            )
        kspace_t = torch.from_numpy(kspace)
        if self.mask_func is not None:
            if seed is None and self.use_seed:
                seed = tuple(map(ord, fname))
            sampled, _ = self.mask_func(kspace.shape + (2,), seed=seed)
            kspace_t = kspace_t * sampled.squeeze(-1)
        elif mask is not None:
            if mask.shape != (kspace.shape[-1],):
                raise DataError(
                    f"{fname}: mask has shape {mask.shape}, expected ({kspace.shape[-1]},) "
                    "to match the k-space width"
                )
            kspace_t = kspace_t * torch.from_numpy(mask).to(torch.float32)

        image = ifft2c(kspace_t)
        crop = self._crop_size(image.shape[-1], target, attrs)
        if not _fits(crop, image.shape) or (target is not None and not _fits(crop, target.shape)):
            raise DataError(
                f"{fname}: cannot crop image {tuple(image.shape[-2:])} and target "
                f"{None if target is None else target.shape} to {crop}; use a smaller crop size"
            )
        image = center_crop(image, crop)
        image = rss(image, dim=0) if self.challenge == "multicoil" else image.abs()

        mean, std = image.mean(), image.std()
        image = ((image - mean) / (std + NORM_EPS)).clamp_(-CLAMP, CLAMP)
        if target is None:
            target_t = torch.zeros(1)
        else:
            target_t = center_crop(torch.from_numpy(target), crop)
            target_t = ((target_t - mean) / (std + NORM_EPS)).clamp_(-CLAMP, CLAMP)

        return UnetSample(
            image=image,
            target=target_t,
            mean=mean,
            std=std,
            fname=fname,
            slice_num=slice_num,
            max_value=float(attrs.get("max", 0.0)),
        )

    def _crop_size(
        self, image_width: int, target: np.ndarray | None, attrs: Mapping[str, Any]
    ) -> tuple[int, int]:
        if self.crop_size is not None:
            crop = tuple(self.crop_size)
        elif target is not None:
            crop = tuple(target.shape[-2:])
        else:
            crop = (attrs["recon_size"][0], attrs["recon_size"][1])
        # fastMRI's rule for images narrower than the crop (some brain FLAIR scans are 320 x 203):
        # fall back to a square of the image width.
        if image_width < crop[1]:
            crop = (image_width, image_width)
        return int(crop[0]), int(crop[1])


def _fits(crop: tuple[int, int], shape: tuple[int, ...]) -> bool:
    """Whether a ``crop = (h, w)`` fits in the last two dims of ``shape``."""
    return crop[0] <= shape[-2] and crop[1] <= shape[-1]


class VarNetSample(NamedTuple):
    """One masked multicoil k-space slice for the VarNet, as fastMRI's ``VarNetSample``.

    Attributes:
        masked_kspace: complex64 ``(C, H, W)``, zero where not sampled.
        mask: bool ``(1, 1, W)``, the sampled columns (fastMRI's ``(1, 1, W, 1)`` without its last
            dim); batched ``(B, 1, 1, W)``, the VarNet's mask shape.
        num_low_frequencies: width of the fully sampled centre band (ACS lines) from the mask
            function; 0 with the file's own mask, for the model to derive it from the mask.
        target: float32 ``(h, w)`` reference image; ``tensor([0.])`` when the file has none.
        fname: file name of the volume.
        slice_num: slice index in the volume.
        max_value: the volume's ``max`` attribute (target maximum), 0.0 without target.
        crop_size: ``(h, w)`` the output is cropped to for the loss and evaluation.
    """

    masked_kspace: torch.Tensor
    mask: torch.Tensor
    num_low_frequencies: int
    target: torch.Tensor
    fname: str
    slice_num: int
    max_value: float
    crop_size: tuple[int, int]


class VarNetDataTransform:
    """Mask multicoil k-space for the VarNet, as ``fastmri.data.transforms.VarNetDataTransform``.

    The columns outside the acquired range of the ISMRMRD header (``attrs["padding_left"]``,
    ``attrs["padding_right"]``) are never sampled. Unlike fastMRI, a file without a header is
    accepted: no padding, and the crop size is the target's (else the k-space's) size; a negative
    ``padding_left`` is taken as 0 (fastMRI's slice ``[:negative]`` would unsample most columns).
    """

    def __init__(self, mask_func: MaskFunc | None = None, use_seed: bool = True):
        """
        Args:
            mask_func: undersampling mask; None keeps the file's own mask (test/challenge data,
                already undersampled).
            use_seed: seed the mask with the file name, so that every slice of a volume and every
                run gets the same mask; False draws a fresh mask each call.
        """
        self.mask_func = mask_func
        self.use_seed = use_seed

    def __call__(
        self,
        kspace: np.ndarray,
        mask: np.ndarray | None,
        target: np.ndarray | None,
        attrs: Mapping[str, Any],
        fname: str,
        slice_num: int,
        seed: Seed | None = None,
    ) -> VarNetSample:
        """
        Args:
            kspace: complex64 ``(C, H, W)`` multicoil k-space.
            mask: the file's sampling mask ``(W,)``, used only when there is no ``mask_func``.
            target: float32 ``(h, w)`` reference image, or None.
            attrs: the file's attributes; reads ``max``, and when present ``padding_left``,
                ``padding_right`` and ``recon_size`` (from the ISMRMRD header).
            fname: file name; the mask seed when ``use_seed``.
            slice_num: slice index.
            seed: mask seed overriding the file-name seed.
        """
        if kspace.ndim != 3:
            raise DataError(
                f"{fname}: the VarNet needs multicoil k-space slices (coils, H, W), got shape "
                f"{kspace.shape}; use --challenge multicoil with a multicoil site"
            )
        width = kspace.shape[-1]
        first = max(int(attrs.get("padding_left", 0)), 0)
        stop = int(attrs.get("padding_right", width))
        if "recon_size" in attrs:
            crop_size = (int(attrs["recon_size"][0]), int(attrs["recon_size"][1]))
        else:
            crop_size = tuple(target.shape[-2:]) if target is not None else tuple(kspace.shape[-2:])
        if target is not None:
            target_t = torch.from_numpy(target)
            max_value = float(attrs["max"])
        else:
            target_t = torch.zeros(1)
            max_value = 0.0

        kspace_t = torch.from_numpy(kspace)
        if self.mask_func is not None:
            if seed is None and self.use_seed:
                seed = tuple(map(ord, fname))
            # fastMRI's apply_mask: one mask (1, 1, W, 1) for all coils and rows.
            sampled, num_low_frequencies = self.mask_func((1,) + kspace.shape[-2:] + (2,), seed=seed)
            sampled = sampled.squeeze(-1)
            sampled[..., :first] = 0
            sampled[..., stop:] = 0
            # "+ 0.0" turns the negative zeros of unsampled entries into zeros, as fastMRI.
            masked = torch.view_as_complex(torch.view_as_real(kspace_t) * sampled.unsqueeze(-1) + 0.0)
        else:
            if mask is None or mask.shape != (width,):
                found = "no mask" if mask is None else f"a mask of shape {mask.shape}"
                raise DataError(
                    f"{fname}: has {found}, but without a mask function the file's own 'mask' "
                    f"dataset of {width} entries (one per k-space column) is needed"
                )
            sampled = torch.from_numpy(mask.astype(np.float32)).reshape(1, 1, width)
            sampled[..., :first] = 0
            sampled[..., stop:] = 0
            masked = kspace_t
            num_low_frequencies = 0

        return VarNetSample(
            masked_kspace=masked,
            mask=sampled.to(torch.bool),
            num_low_frequencies=int(num_low_frequencies),
            target=target_t,
            fname=fname,
            slice_num=slice_num,
            max_value=max_value,
            crop_size=crop_size,
        )
