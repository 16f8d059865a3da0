"""The fastMRI U-Net, with an encoder/decoder split and a choice of normalisation.

With ``norm="instance"`` the module tree, state_dict keys and outputs match ``fastmri.models.Unet``,
so public fastMRI U-Net weights load with ``load_state_dict(strict=True)`` (or :func:`load_pretrained`
for a checkpoint file). The other norms add parameters at the positions of fastMRI's parameter-free
InstanceNorm layers (``...layers.1.*``, ``...layers.5.*``), so every convolution keeps its key.
"""

import re
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F

from utils.errors import CheckpointError

Norm = Literal["instance", "instance_affine", "batch"]
NORMS: tuple[str, ...] = get_args(Norm)
# The command-line flag (options.py) that sets each constructor argument; in/out channels have none.
FLAGS = {"chans": "--chans", "num_pool_layers": "--num_pools", "norm": "--norm"}


def make_norm(norm: Norm, channels: int) -> nn.Module:
    """A 2D normalisation layer over ``channels`` feature maps.

    Args:
        norm: "instance" (InstanceNorm2d without parameters, as fastMRI), "instance_affine"
            (InstanceNorm2d with a learned scale and shift) or "batch" (BatchNorm2d).
        channels: number of channels C of the (B, C, H, W) input.
    """
    if norm == "instance":
        return nn.InstanceNorm2d(channels)
    if norm == "instance_affine":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ConvBlock(nn.Module):
    """Two rounds of 3x3 convolution (no bias), normalisation, LeakyReLU(0.2) and Dropout2d.

    Maps (B, in_chans, H, W) to (B, out_chans, H, W).
    """

    def __init__(self, in_chans: int, out_chans: int, drop_prob: float, norm: Norm):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, out_chans, H, W)."""
        return self.layers(image)


class TransposeConvBlock(nn.Module):
    """A 2x2 stride-2 transposed convolution (no bias), normalisation and LeakyReLU(0.2).

    Maps (B, in_chans, H, W) to (B, out_chans, 2H, 2W).
    """

    def __init__(self, in_chans: int, out_chans: int, norm: Norm):
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            make_norm(norm, out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, out_chans, 2H, 2W)."""
        return self.layers(image)


def _pad_to_skip(upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Reflect-pad ``upsampled`` on the right and bottom to the spatial size of ``skip``.

    After an odd-sized level was average-pooled (flooring), the upsampled map is one pixel short;
    fastMRI reflect-pads that pixel. (B, C, h, w) -> (B, C, H, W) with H - h, W - w in {0, 1}.
    """
    pad_w = skip.shape[-1] - upsampled.shape[-1]
    pad_h = skip.shape[-2] - upsampled.shape[-2]
    if pad_w == 0 and pad_h == 0:
        return upsampled
    return F.pad(upsampled, [0, pad_w, 0, pad_h], mode="reflect")


class Unet(nn.Module):
    """The fastMRI U-Net (Ronneberger et al. 2015, as configured by fastMRI).

    Encoder: ``num_pool_layers`` conv blocks, each followed by 2x2 average pooling
    (``down_sample_layers``), then the bottleneck conv block (``conv``). Decoder: per level a
    transposed-conv block (``up_transpose_conv``), concatenation of the skip and a conv block
    (``up_conv``); the last ``up_conv`` entry ends with a 1x1 convolution with bias.

    A state_dict key belongs to the encoder iff ``key.startswith(Unet.encoder_prefixes)`` and to
    the decoder iff ``key.startswith(Unet.decoder_prefixes)``; together they cover every key.
    """

    encoder_prefixes: tuple[str, ...] = ("down_sample_layers.", "conv.")
    decoder_prefixes: tuple[str, ...] = ("up_transpose_conv.", "up_conv.")

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 1,
        chans: int = 32,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
        norm: Norm = "instance",
    ):
        """
        Args:
            in_chans: channels of the input image.
            out_chans: channels of the output image.
            chans: channels after the first conv block; doubled at each level down.
            num_pool_layers: number of down- (and up-) sampling levels.
            drop_prob: Dropout2d probability after every activation of the conv blocks.
            norm: normalisation layer, see :func:`make_norm`.
        """
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.chans = chans
        self.num_pool_layers = num_pool_layers
        self.drop_prob = drop_prob
        self.norm = norm

        self.down_sample_layers = nn.ModuleList([ConvBlock(in_chans, chans, drop_prob, norm)])
        ch = chans
        for _ in range(num_pool_layers - 1):
            self.down_sample_layers.append(ConvBlock(ch, ch * 2, drop_prob, norm))
            ch *= 2
        self.conv = ConvBlock(ch, ch * 2, drop_prob, norm)

        self.up_transpose_conv = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for _ in range(num_pool_layers - 1):
            self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch, norm))
            self.up_conv.append(ConvBlock(ch * 2, ch, drop_prob, norm))
            ch //= 2
        self.up_transpose_conv.append(TransposeConvBlock(ch * 2, ch, norm))
        self.up_conv.append(
            nn.Sequential(
                ConvBlock(ch * 2, ch, drop_prob, norm),
                nn.Conv2d(ch, out_chans, kernel_size=1, stride=1),
            )
        )

    @property
    def latent_channels(self) -> int:
        """Channels of the bottleneck output: ``chans * 2**num_pool_layers`` (512 for 32, 4)."""
        return self.chans * 2**self.num_pool_layers

    def _encode(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down path and bottleneck: (B, in_chans, H, W) -> (latent, skips, shallowest first)."""
        skips = []
        output = image
        for block in self.down_sample_layers:
            output = block(output)
            skips.append(output)
            output = F.avg_pool2d(output, kernel_size=2, stride=2, padding=0)
        return self.conv(output), skips

    def _decode(self, latent: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Up path and head: the bottleneck output and the skips -> (B, out_chans, H, W)."""
        output = latent
        for transpose_conv, block, skip in zip(self.up_transpose_conv, self.up_conv, reversed(skips)):
            output = _pad_to_skip(transpose_conv(output), skip)
            output = block(torch.cat([output, skip], dim=1))
        return output

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The bottleneck output, without running the decoder.

        Args:
            image: (B, in_chans, H, W).

        Returns:
            (B, latent_channels, h, w) with h = H // 2**num_pool_layers, w likewise (each pooling
            floors an odd size).
        """
        return self._encode(image)[0]

    def forward_with_latent(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass giving the reconstruction and the bottleneck output.

        Args:
            image: (B, in_chans, H, W).

        Returns:
            output (B, out_chans, H, W), equal to ``forward(image)``, and latent
            (B, latent_channels, h, w), equal to ``encode(image)``.
        """
        latent, skips = self._encode(image)
        return self._decode(latent, skips), latent

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, out_chans, H, W)."""
        latent, skips = self._encode(image)
        return self._decode(latent, skips)

    def fastmri_keys(self) -> list[str]:
        """The state_dict keys that fastMRI's U-Net has: all of them. A subclass that adds blocks
        leaves those out; `load_pretrained` fills these keys and the added blocks keep their init."""
        return list(self.state_dict())


def _read_checkpoint(path: Path, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The state_dict stored in ``path``: raw, or under "state_dict" (Lightning: the keys under the
    module's attribute ``prefix`` are kept, without it, e.g. "unet." for fastMRI's UnetModule)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err.strerror}); check --pretrained") from err
    except Exception as err:  # torch.load fails on non-checkpoints with many exception types
        message = str(err)
        if message.startswith("Weights only load failed"):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
            what = f" (it holds a {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused by weights-only loading{what}; save only the model's state_dict "
                "with torch.save(model.state_dict(), path)"
            ) from err
        reason = message.splitlines()[0] if message else "no data"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {reason})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__} that is not a state_dict of tensors, "
            "nor a dict with one under 'state_dict'"
        )
    if any(key.startswith(prefix) for key in obj):
        obj = {key.removeprefix(prefix): v for key, v in obj.items() if key.startswith(prefix)}
    return obj


def _architecture(state: dict[str, torch.Tensor]) -> dict[str, object] | None:
    """The U-Net constructor arguments a fastMRI-format state_dict was saved from; None if not a U-Net."""
    levels = {int(m.group(1)) for key in state if (m := re.match(r"down_sample_layers\.(\d+)\.", key))}
    first = state.get("down_sample_layers.0.layers.0.weight")
    head = state.get(f"up_conv.{len(levels) - 1}.1.weight")
    if first is None or head is None or first.dim() != 4 or head.dim() != 4:
        return None
    if "down_sample_layers.0.layers.1.running_mean" in state:
        norm = "batch"
    elif "down_sample_layers.0.layers.1.weight" in state:
        norm = "instance_affine"
    else:
        norm = "instance"
    return {
        "in_chans": first.shape[1],
        "out_chans": head.shape[0],
        "chans": first.shape[0],
        "num_pool_layers": len(levels),
        "norm": norm,
    }


def pretrained_architecture(path: str | Path) -> dict[str, object] | None:
    """`_architecture` of the U-Net weights in ``path``; None when the file is unreadable or holds
    no U-Net (`load_pretrained` then says why)."""
    try:
        return _architecture(_read_checkpoint(Path(path)))
    except CheckpointError:
        return None


def load_pretrained(model: Unet, path: str | Path) -> None:
    """Load fastMRI-format U-Net weights from ``path`` into ``model`` (strictly: all keys, all shapes;
    a personalised model's added blocks, outside `Unet.fastmri_keys`, keep their init).

    The file is read with ``torch.load(weights_only=True)`` and may hold a raw state_dict or a dict
    with it under "state_dict" (a Lightning checkpoint, whose "unet." key prefix is stripped).

    Raises:
        CheckpointError: one line naming the file: unreadable, not a state_dict, refused by
            weights-only loading, or weights of another architecture (with the flags that match).
    """
    path = Path(path)
    state = _read_checkpoint(path)
    refused = load_fastmri_part(model, state)
    if refused is None:
        return
    expected, mismatched = refused

    found = _architecture(state)
    ours = _architecture(expected)
    if found is not None and ours is not None and found != ours:
        diffs = [name for name in ours if found[name] != ours[name]]
        theirs = ", ".join(f"{name}={found[name]}" for name in diffs)
        mine = ", ".join(f"{name}={ours[name]}" for name in diffs)
        flags = " ".join(f"{FLAGS[name]} {found[name]}" for name in diffs if name in FLAGS)
        advice = f"; run with {flags}" if flags else ""
        raise CheckpointError(f"{path}: weights are for a U-Net with {theirs}, this model has {mine}{advice}")
    raise key_mismatch(path, state, expected, mismatched, "U-Net")


def load_fastmri_part(model: nn.Module, state: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """Load ``state`` into the model's `fastmri_keys` when it holds exactly those keys at their
    shapes (None: loaded; the other keys keep their init). Else, for the error: the fastMRI part of
    the model's state_dict and the keys whose shapes differ."""
    full = model.state_dict()
    expected = {k: full[k] for k in model.fastmri_keys()}
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if set(state) == set(expected) and not mismatched:
        model.load_state_dict(state, strict=len(expected) == len(full))
        return None
    return expected, mismatched


def key_mismatch(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 mismatched: list[str], model: str) -> CheckpointError:
    """The error for a state_dict whose shapes (`mismatched` keys) or key set differ from `expected`."""
    if mismatched:
        key = mismatched[0]
        return CheckpointError(
            f"{path}: {key} has shape {tuple(state[key].shape)} in the file, "
            f"{tuple(expected[key].shape)} in the model ({len(mismatched)} shapes differ)"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    example = missing[:1] + unexpected[:1]
    return CheckpointError(
        f"{path}: not weights of this {model}: {len(missing)} keys missing, {len(unexpected)} unexpected "
        f"(e.g. {', '.join(example)})"
    )
