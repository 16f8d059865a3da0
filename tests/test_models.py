"""The U-Net is fastMRI's (keys, shapes, outputs, checkpoints); the FL-MRCM discriminator fits its latent."""

from pathlib import Path

import pytest
import torch

from models.discriminator import LatentDiscriminator, pool_latent
from models.personalized_unet import PersonalizedUnet
from models.unet import Unet, load_pretrained
from utils.errors import CheckpointError

CONFIGS = [
    dict(in_chans=1, out_chans=1, chans=8, num_pool_layers=4),
    dict(in_chans=2, out_chans=3, chans=4, num_pool_layers=3),
]
SHAPES = [(2, 1, 32, 32), (1, 1, 37, 45)]


class Payload:
    """An arbitrary Python object: pickling it makes a file that weights-only loading refuses."""


def fastmri_unet(**kwargs: int) -> torch.nn.Module:
    """A reference ``fastmri.models.Unet`` (skips the test where fastmri is not installed)."""
    fastmri_models = pytest.importorskip("fastmri.models")
    return fastmri_models.Unet(**kwargs)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_unet_has_fastmri_parameter_count() -> None:
    assert n_params(Unet()) == 7_756_097


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_keys_and_shapes_match_fastmri(config: dict[str, int]) -> None:
    ours = {k: v.shape for k, v in Unet(**config).state_dict().items()}
    ref = {k: v.shape for k, v in fastmri_unet(**config).state_dict().items()}
    assert ours == ref


@pytest.mark.parametrize("shape", SHAPES)
def test_weights_exchange_with_fastmri_both_ways_gives_equal_outputs(shape: tuple[int, ...]) -> None:
    config = dict(in_chans=1, out_chans=1, chans=8, num_pool_layers=3)
    torch.manual_seed(0)
    image = torch.randn(shape)
    ref, ours = fastmri_unet(**config).eval(), Unet(**config).eval()

    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(image), ref(image))

    torch.manual_seed(1)
    ours = Unet(**config).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(image)
        torch.testing.assert_close(out, ref(image))
    assert out.shape == shape


def test_forward_with_latent_matches_forward_and_encode() -> None:
    torch.manual_seed(0)
    model = Unet(chans=8, num_pool_layers=3).eval()
    image = torch.randn(1, 1, 37, 45)
    with torch.no_grad():
        output, latent = model.forward_with_latent(image)
        torch.testing.assert_close(output, model(image))
        torch.testing.assert_close(latent, model.encode(image))
    # 37 -> 18 -> 9 -> 4 and 45 -> 22 -> 11 -> 5 after three 2x2 poolings.
    assert latent.shape == (1, model.latent_channels, 4, 5)
    assert model.latent_channels == 64
    assert Unet().latent_channels == 512


def test_encode_runs_no_decoder_layer() -> None:
    model = Unet(chans=4, num_pool_layers=2)
    called = []
    for name in ("up_transpose_conv", "up_conv"):
        getattr(model, name).register_forward_pre_hook(lambda module, args, name=name: called.append(name))
    model.encode(torch.randn(1, 1, 16, 16))
    assert called == []


def test_encoder_and_decoder_prefixes_split_every_key() -> None:
    keys = list(Unet(chans=4, num_pool_layers=3, norm="batch").state_dict())
    encoder = [k for k in keys if k.startswith(Unet.encoder_prefixes)]
    decoder = [k for k in keys if k.startswith(Unet.decoder_prefixes)]
    assert sorted(encoder + decoder) == sorted(keys)
    assert not set(encoder) & set(decoder)
    assert "conv.layers.4.weight" in encoder and "up_conv.2.1.bias" in decoder


@pytest.mark.parametrize("norm", ["instance_affine", "batch"])
def test_norm_variants_add_norm_parameters_and_keep_conv_keys(norm: str) -> None:
    plain = Unet(chans=4, num_pool_layers=3).state_dict()
    variant_model = Unet(chans=4, num_pool_layers=3, norm=norm)
    variant = variant_model.state_dict()
    assert all(variant[k].shape == v.shape for k, v in plain.items())
    extra = set(variant) - set(plain)
    assert extra and all(".layers.1." in k or ".layers.5." in k for k in extra)
    assert "down_sample_layers.0.layers.1.weight" in extra
    assert "up_transpose_conv.0.layers.1.bias" in extra
    assert n_params(variant_model) > n_params(Unet(chans=4, num_pool_layers=3))
    assert variant_model(torch.randn(2, 1, 20, 20)).shape == (2, 1, 20, 20)


def test_load_pretrained_reads_a_fastmri_state_dict(tmp_path: Path) -> None:
    config = dict(in_chans=1, out_chans=1, chans=8, num_pool_layers=3)
    ref = fastmri_unet(**config).eval()
    torch.save(ref.state_dict(), tmp_path / "unet.pt")
    model = Unet(**config).eval()
    load_pretrained(model, tmp_path / "unet.pt")
    image = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(image), ref(image))


def test_load_pretrained_fills_a_personalised_unet_and_keeps_its_blocks(tmp_path: Path) -> None:
    """--strategy pfl --pretrained: every fastMRI key comes from the file, the mapper and the
    personalisation blocks keep their init; a missing U-Net key is still refused."""
    source = Unet(chans=4, num_pool_layers=2)
    torch.save(source.state_dict(), tmp_path / "unet.pt")
    model = PersonalizedUnet(code_size=3, chans=4, num_pool_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained(model, tmp_path / "unet.pt")
    after = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(after[key], value)
    added = set(after) - set(source.state_dict())
    assert added and all(k.startswith(("mapper.", "personal_blocks.")) for k in added)
    for key in added:
        assert torch.equal(after[key], before[key])
    partial = {k: v for k, v in source.state_dict().items() if k != "conv.layers.0.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt"):
        load_pretrained(PersonalizedUnet(code_size=3, chans=4, num_pool_layers=2), tmp_path / "partial.pt")


def test_load_pretrained_reads_a_lightning_checkpoint(tmp_path: Path) -> None:
    source = Unet(chans=4, num_pool_layers=2)
    checkpoint = {"epoch": 3, "state_dict": {"unet." + k: v for k, v in source.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "epoch=3.ckpt")
    model = Unet(chans=4, num_pool_layers=2)
    load_pretrained(model, tmp_path / "epoch=3.ckpt")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_load_pretrained_rejects_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="notes.txt: not a PyTorch checkpoint") as info:
        load_pretrained(Unet(chans=4, num_pool_layers=2), path)
    assert "\n" not in str(info.value)


def test_load_pretrained_names_the_chans_flag_on_a_width_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(Unet(chans=8, num_pool_layers=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="wide.pt") as info:
        load_pretrained(Unet(chans=4, num_pool_layers=2), path)
    assert "chans=8" in str(info.value) and "--chans 8" in str(info.value)
    assert "num_pool" not in str(info.value)


def test_load_pretrained_names_the_num_pools_flag_on_a_depth_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "deep.pt"
    torch.save(Unet(chans=4, num_pool_layers=3).state_dict(), path)
    with pytest.raises(CheckpointError, match="deep.pt: .*num_pool_layers=3.*--num_pools 3"):
        load_pretrained(Unet(chans=4, num_pool_layers=2), path)


def test_load_pretrained_names_the_norm_flag_for_fastmri_weights_in_a_batchnorm_model(tmp_path: Path) -> None:
    path = tmp_path / "fastmri.pt"
    torch.save(Unet(chans=4, num_pool_layers=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="--norm instance"):
        load_pretrained(Unet(chans=4, num_pool_layers=2, norm="batch"), path)


def test_load_pretrained_refuses_a_pickled_object(tmp_path: Path) -> None:
    path = tmp_path / "payload.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="payload.pt: refused by weights-only loading") as info:
        load_pretrained(Unet(chans=4, num_pool_layers=2), path)
    assert "Payload" in str(info.value) and "\n" not in str(info.value)


def test_load_pretrained_rejects_a_tensor_and_a_missing_file(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="tensor.pt: holds a Tensor"):
        load_pretrained(Unet(chans=4, num_pool_layers=2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="absent.pt: cannot read checkpoint"):
        load_pretrained(Unet(chans=4, num_pool_layers=2), tmp_path / "absent.pt")


def test_pool_latent_averages_quadrants_into_four_values_per_channel() -> None:
    latent = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = pool_latent(latent)
    assert pooled.shape == (2, 12)
    top_left = latent[:, :, :2, :2].mean(dim=(-2, -1))
    torch.testing.assert_close(pooled.reshape(2, 3, 4)[:, :, 0], top_left)


def test_discriminator_takes_the_pooled_latent_of_the_default_unet() -> None:
    latent = torch.randn(2, Unet().latent_channels, 20, 20)
    features = pool_latent(latent)
    assert features.shape == (2, 2048)
    discriminator = LatentDiscriminator()
    assert discriminator(features).shape == (2, 2)
    assert n_params(discriminator) == 2048 * 256 + 256 + 256 * 2 + 2


def test_discriminator_gradient_reaches_the_unet_encoder() -> None:
    model = Unet(chans=4, num_pool_layers=2)
    discriminator = LatentDiscriminator(in_features=4 * model.latent_channels)
    _, latent = model.forward_with_latent(torch.randn(2, 1, 16, 16))
    discriminator(pool_latent(latent)).sum().backward()
    assert model.conv.layers[0].weight.grad is not None
    assert model.up_conv[0].layers[0].weight.grad is None
