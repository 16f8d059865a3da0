"""The VarNet, its SSIM loss and its data transform are fastMRI's: keys, shapes, outputs, samples."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.mri_data import SliceDataset
from data.subsample import EquispacedMaskFractionFunc, RandomMaskFunc
from data.transforms import VarNetDataTransform, VarNetSample
from models.ssim_loss import SSIMLoss
from federated.strategies import STRATEGIES
from models.personalized_varnet import PersonalizedVarNet
from models.unet import Unet
from models.varnet import VarNet, acs_columns, load_pretrained_varnet
from options import parse_options
from tests.helpers_data import ismrmrd_header, write_fastmri
from utils.errors import CheckpointError, DataError

SMALL = dict(num_cascades=2, sens_chans=3, sens_pools=2, chans=4, pools=2)
# (B, C, H, W): even and odd sizes, none a multiple of 16 (NormUnet pads).
SIZES = [(1, 4, 32, 24), (1, 3, 37, 29), (2, 2, 30, 33)]
# A multicoil file: 20 x 24 k-space, header padding 2 columns left and 2 right.
KSPACE_SHAPE = (20, 24)
COILS = 4
HEADER = dict(encoding=(40, 26, 1), recon=(8, 8, 1), center=11, maximum=19)
PADDING = (2, 22)


def fastmri_varnet(**kwargs: int) -> torch.nn.Module:
    """A reference ``fastmri.models.VarNet`` (skips the test where fastmri is not installed)."""
    fastmri_models = pytest.importorskip("fastmri.models", reason="fastmri is not installed")
    return fastmri_models.VarNet(**kwargs)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def masked_batch(size: tuple[int, int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex (B, C, H, W) k-space sampled on random columns and a centre band of 6, and its
    bool (B, 1, 1, W) mask."""
    generator = torch.Generator().manual_seed(seed)
    b, _, _, w = size
    kspace = torch.randn(size, dtype=torch.complex64, generator=generator)
    mask = torch.rand(b, 1, 1, w, generator=generator) < 0.3
    mask[..., (w - 6 + 1) // 2 : (w - 6 + 1) // 2 + 6] = True
    return kspace * mask, mask


def run_fastmri(model: torch.nn.Module, kspace: torch.Tensor, mask: torch.Tensor, nlf=None) -> torch.Tensor:
    """fastMRI's VarNet on our layout: trailing-2 k-space (B, C, H, W, 2), mask (B, 1, 1, W, 1)."""
    return model(torch.view_as_real(kspace), mask.unsqueeze(-1), nlf)


# --- model -----------------------------------------------------------------------------------


def test_paper_varnet_has_fastmri_parameter_count() -> None:
    assert n_params(VarNet()) == 29_936_966


@pytest.mark.parametrize("config", [
    SMALL,
    dict(num_cascades=3, sens_chans=2, sens_pools=3, chans=5, pools=1),
    dict(num_cascades=2, sens_chans=2, sens_pools=4, chans=3, pools=4),
])
def test_state_dict_keys_and_shapes_match_fastmri(config: dict[str, int]) -> None:
    ours = {k: v.shape for k, v in VarNet(**config).state_dict().items()}
    assert ours == {k: v.shape for k, v in fastmri_varnet(**config).state_dict().items()}


def test_cascade_unets_are_the_project_unet() -> None:
    model = VarNet(**SMALL)
    assert isinstance(model.sens_net.norm_unet.unet, Unet)
    assert all(isinstance(cascade.model.unet, Unet) for cascade in model.cascades)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("nlf", [None, 6])
def test_weights_exchange_with_fastmri_both_ways_gives_equal_outputs(size, nlf) -> None:
    kspace, mask = masked_batch(size)
    torch.manual_seed(0)
    reference, ours = fastmri_varnet(**SMALL).eval(), VarNet(**SMALL).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(kspace, mask, nlf)
        assert out.shape == (size[0],) + size[2:]
        torch.testing.assert_close(out, run_fastmri(reference, kspace, mask, nlf), rtol=0, atol=1e-5)

    torch.manual_seed(1)
    ours = VarNet(**SMALL).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(kspace, mask, nlf), run_fastmri(reference, kspace, mask, nlf),
                                   rtol=0, atol=1e-5)


def test_gradients_equal_fastmri() -> None:
    kspace, mask = masked_batch((1, 3, 24, 20))
    reference = fastmri_varnet(**SMALL)
    ours = VarNet(**SMALL)
    ours.load_state_dict(reference.state_dict())
    ours(kspace, mask, 6).square().mean().backward()
    run_fastmri(reference, kspace, mask, 6).square().mean().backward()
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_batch_with_a_band_width_per_sample_equals_each_sample_alone() -> None:
    """fastMRI's VarNet refuses a (B,) num_low_frequencies tensor; ours runs each sample with its own
    band, a 0 entry meaning: derive it from the mask."""
    kspace, mask = masked_batch((3, 2, 24, 20))
    reference = fastmri_varnet(**SMALL).eval()
    ours = VarNet(**SMALL).eval()
    ours.load_state_dict(reference.state_dict())
    widths = [6, 2, 0]
    with torch.no_grad():
        batched = ours(kspace, mask, torch.tensor(widths))
        for i, width in enumerate(widths):
            alone = run_fastmri(reference, kspace[i : i + 1], mask[i : i + 1], width)
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)


def test_personalized_varnet_keeps_every_varnet_key_and_stages_every_cascade_unet() -> None:
    model = PersonalizedVarNet(code_size=3, **SMALL)
    varnet = {k: v.shape for k, v in VarNet(**SMALL).state_dict().items()}
    keys = {k: v.shape for k, v in model.state_dict().items()}
    assert all(keys[k] == shape for k, shape in varnet.items())
    assert all(k.startswith("mapper.") or ".unet.personal_blocks." in k for k in set(keys) - set(varnet))
    cascade_unets = [k for k in varnet if k.startswith("cascades.") and ".unet." in k]
    stages = model.stages()
    assert len(stages) == 2 * SMALL["pools"] + 1
    for key in cascade_unets:  # each key in exactly one stage
        assert sum(key.startswith(p) for stage in stages for p in stage) == 1, key


def test_personalized_varnet_output_depends_on_the_site_code_and_codes_batch() -> None:
    torch.manual_seed(0)
    model = PersonalizedVarNet(code_size=2, **SMALL).eval()
    for block in model.modules():  # the AdaIN starts at identity: give it a modulation to see
        if hasattr(block, "gamma"):
            torch.nn.init.normal_(block.gamma.weight, std=0.1)
    kspace, mask = masked_batch((2, 3, 24, 20))
    codes = torch.eye(2)
    with torch.no_grad():
        outputs = [model(kspace, mask, 6, code) for code in codes]
        mixed = model(kspace, mask, 6, codes[[0, 1]])
    assert outputs[0].shape == (2, 24, 20)
    assert not torch.allclose(outputs[0], outputs[1])
    torch.testing.assert_close(mixed[0], outputs[0][0])
    torch.testing.assert_close(mixed[1], outputs[1][1])


def test_pfl_on_a_varnet_averages_the_parts_without_blocks_and_the_chosen_stages() -> None:
    flags = ["--model", "varnet", "--strategy", "pfl", *(f"--{k}={v}" for k, v in SMALL.items())]
    strategy = STRATEGIES["pfl"](parse_options(flags, "test", "pfl", ""))
    keys = list(strategy.build_model(["F", "H"]).state_dict())
    shared = {k for k in keys if strategy.is_shared(k)}
    assert {k for k in keys if k.startswith(("mapper.", "sens_net.")) or k.endswith("dc_weight")} <= shared
    assert not any(".personal_blocks." in k or ".down_sample_layers." in k or ".unet.conv." in k
                   for k in shared if k.startswith("cascades."))
    assert all(k in shared for k in keys if ".up_conv." in k or ".up_transpose_conv." in k)


def test_acs_columns_keeps_the_centre_band_of_each_sample() -> None:
    mask = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 3:7] = True  # a band of 4 around the centre column 5
    mask[1, ..., 4:6] = True
    band = acs_columns(mask, torch.tensor([0, 3]))
    assert band[0, 0, 0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert band[1, 0, 0].nonzero().flatten().tolist() == [4, 5, 6]  # pad = (10 - 3 + 1) // 2 = 4


# --- pretrained weights -----------------------------------------------------------------------


def test_load_pretrained_varnet_reads_a_fastmri_state_dict(tmp_path: Path) -> None:
    reference = fastmri_varnet(**SMALL).eval()
    torch.save(reference.state_dict(), tmp_path / "varnet.pt")
    model = VarNet(**SMALL).eval()
    load_pretrained_varnet(model, tmp_path / "varnet.pt")
    kspace, mask = masked_batch((1, 3, 24, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(kspace, mask), run_fastmri(reference, kspace, mask), rtol=0, atol=1e-5)


def test_load_pretrained_varnet_fills_a_personalised_varnet_and_keeps_its_blocks(tmp_path: Path) -> None:
    source = VarNet(**SMALL)
    torch.save(source.state_dict(), tmp_path / "varnet.pt")
    model = PersonalizedVarNet(code_size=2, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained_varnet(model, tmp_path / "varnet.pt")
    after = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(after[key], value)
    for key in set(after) - set(source.state_dict()):
        assert key.startswith("mapper.") or ".personal_blocks." in key
        assert torch.equal(after[key], before[key])


def test_load_pretrained_varnet_reads_a_lightning_checkpoint_and_ignores_the_loss_buffer(tmp_path: Path) -> None:
    source = VarNet(**SMALL)
    state = {"varnet." + k: v for k, v in source.state_dict().items()}
    state["loss.w"] = SSIMLoss().w
    torch.save({"epoch": 3, "global_step": 30, "state_dict": state}, tmp_path / "epoch=3.ckpt")
    model = VarNet(**SMALL)
    load_pretrained_varnet(model, tmp_path / "epoch=3.ckpt")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_load_pretrained_varnet_names_the_flags_of_weights_of_another_size(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save(VarNet(num_cascades=3, sens_chans=3, sens_pools=2, chans=6, pools=3).state_dict(), path)
    with pytest.raises(CheckpointError, match="big.pt") as info:
        load_pretrained_varnet(VarNet(**SMALL), path)
    message = str(info.value)
    assert "--num_cascades 3 --chans 6 --pools 3" in message
    assert "sens" not in message and "\n" not in message


def test_load_pretrained_varnet_names_sensitivity_flags(tmp_path: Path) -> None:
    path = tmp_path / "sens.pt"
    torch.save(VarNet(**{**SMALL, "sens_chans": 5, "sens_pools": 1}).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"sens.pt: .*; run with --sens_chans 5 --sens_pools 1$"):
        load_pretrained_varnet(VarNet(**SMALL), path)


def test_load_pretrained_varnet_refuses_unet_weights_and_pickled_objects(tmp_path: Path) -> None:
    torch.save(Unet(in_chans=2, out_chans=2, chans=4, num_pool_layers=2).state_dict(), tmp_path / "unet.pt")
    with pytest.raises(CheckpointError, match="unet.pt: holds U-Net weights.*--model unet"):
        load_pretrained_varnet(VarNet(**SMALL), tmp_path / "unet.pt")
    torch.save({"state_dict": Path("x")}, tmp_path / "object.pt")
    with pytest.raises(CheckpointError, match="object.pt: refused by weights-only loading"):
        load_pretrained_varnet(VarNet(**SMALL), tmp_path / "object.pt")


# --- SSIM loss --------------------------------------------------------------------------------


def test_ssim_loss_equals_fastmri() -> None:
    fastmri = pytest.importorskip("fastmri", reason="fastmri is not installed")
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 30, 27, generator=generator) * 5
    output = (target + 0.3 * torch.randn(target.shape, generator=generator)).requires_grad_()
    data_range = target.amax(dim=(1, 2, 3))
    ours, theirs = SSIMLoss(), fastmri.SSIMLoss()
    loss = ours(output, target, data_range)
    (grad,) = torch.autograd.grad(loss, output)
    reference = theirs(output, target, data_range)
    (reference_grad,) = torch.autograd.grad(reference, output)
    assert loss.dim() == 0 and 0 < loss.item() < 1
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-6)
    per_position = ours(output, target, data_range, reduced=False)
    assert per_position.shape == (3, 1, 24, 21)
    torch.testing.assert_close(per_position, theirs(output, target, data_range, reduced=False), rtol=0, atol=1e-6)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["w"]


# --- data transform ---------------------------------------------------------------------------


def write_multicoil(path: Path, seed: int, mask: bool = False) -> None:
    """A multicoil fastMRI file (3 slices, 4 coils, 20 x 24) whose header pads 2 columns each side."""
    write_fastmri(path, shape=KSPACE_SHAPE, coils=COILS, header=False, mask=mask, seed=seed)
    with h5py.File(path, "a") as hf:
        hf.create_dataset("ismrmrd_header", data=ismrmrd_header(**HEADER))


@pytest.fixture
def multicoil_root(tmp_path: Path) -> Path:
    root = tmp_path / "multicoil"
    for i in range(2):
        write_multicoil(root / f"vol{i}.h5", seed=i, mask=True)
    return root


def assert_same_sample(ours: VarNetSample, theirs) -> None:
    assert ours.masked_kspace.shape == (COILS,) + KSPACE_SHAPE and ours.masked_kspace.dtype == torch.complex64
    assert torch.equal(torch.view_as_real(ours.masked_kspace), theirs.masked_kspace)
    assert ours.mask.dtype == torch.bool and ours.mask.shape == (1, 1, KSPACE_SHAPE[1])
    assert torch.equal(ours.mask, theirs.mask.squeeze(-1))
    assert ours.num_low_frequencies == theirs.num_low_frequencies
    assert torch.equal(ours.target, theirs.target)
    assert (ours.fname, ours.slice_num) == (theirs.fname, theirs.slice_num)
    assert ours.max_value == theirs.max_value
    assert ours.crop_size == tuple(theirs.crop_size)


@pytest.mark.parametrize("mask_type", ["random", "equispaced_fraction"])
def test_transform_through_the_datasets_equals_fastmri(multicoil_root: Path, mask_type: str) -> None:
    fastmri_data = pytest.importorskip("fastmri.data", reason="fastmri is not installed")
    from fastmri.data import subsample as fastmri_subsample
    from fastmri.data import transforms as fastmri_transforms

    ours_cls, theirs_cls = {
        "random": (RandomMaskFunc, fastmri_subsample.RandomMaskFunc),
        "equispaced_fraction": (EquispacedMaskFractionFunc, fastmri_subsample.EquispacedMaskFractionFunc),
    }[mask_type]
    fractions, accelerations = [0.25, 0.125], [2, 4]
    ours_mask, theirs_mask = ours_cls(fractions, accelerations), theirs_cls(fractions, accelerations)
    ours = SliceDataset(sorted(multicoil_root.iterdir()), VarNetDataTransform(ours_mask), challenge="multicoil")
    theirs = fastmri_data.SliceDataset(
        multicoil_root, challenge="multicoil", transform=fastmri_transforms.VarNetDataTransform(theirs_mask)
    )
    assert len(ours) == len(theirs) == 6
    for i in range(len(ours)):
        sample = ours[i]
        assert_same_sample(sample, theirs[i])
        assert sample.crop_size == (8, 8)
        assert not sample.mask[..., : PADDING[0]].any() and not sample.mask[..., PADDING[1] :].any()

    # The header padding unsampled columns the mask function had sampled.
    unpadded = [ours_mask((1,) + KSPACE_SHAPE + (2,), seed=tuple(map(ord, path.name)))[0][0, 0, :, 0]
                for path in sorted(multicoil_root.iterdir())]
    assert any(m[: PADDING[0]].any() or m[PADDING[1] :].any() for m in unpadded)


def test_transform_without_mask_function_keeps_the_files_mask_as_fastmri(multicoil_root: Path) -> None:
    fastmri_data = pytest.importorskip("fastmri.data", reason="fastmri is not installed")
    from fastmri.data import transforms as fastmri_transforms

    ours = SliceDataset(sorted(multicoil_root.iterdir()), VarNetDataTransform(), challenge="multicoil")
    theirs = fastmri_data.SliceDataset(
        multicoil_root, challenge="multicoil", transform=fastmri_transforms.VarNetDataTransform()
    )
    for i in range(len(ours)):
        sample = ours[i]
        assert_same_sample(sample, theirs[i])
        assert sample.num_low_frequencies == 0
        assert sample.mask[0, 0, PADDING[0] : PADDING[1]].tolist() == [
            c % 2 == 0 for c in range(PADDING[0], PADDING[1])
        ]


def test_collated_samples_run_through_the_varnet_as_one_batch(multicoil_root: Path) -> None:
    mask_func = RandomMaskFunc([0.25, 0.125], [2, 4])
    dataset = SliceDataset(sorted(multicoil_root.iterdir()), VarNetDataTransform(mask_func), challenge="multicoil")
    batch = next(iter(DataLoader(dataset, batch_size=6)))
    assert batch.masked_kspace.shape == (6, COILS) + KSPACE_SHAPE
    assert batch.mask.shape == (6, 1, 1, KSPACE_SHAPE[1]) and batch.num_low_frequencies.shape == (6,)
    assert set(batch.num_low_frequencies.tolist()) == {6, 3}  # the two volumes drew different bands
    model = VarNet(**SMALL).eval()
    with torch.no_grad():
        output = model(batch.masked_kspace, batch.mask, batch.num_low_frequencies)
        alone = model(batch.masked_kspace[-1:], batch.mask[-1:], int(batch.num_low_frequencies[-1]))
    assert output.shape == (6,) + KSPACE_SHAPE
    torch.testing.assert_close(output[-1:], alone, rtol=0, atol=1e-5)


def test_transform_refuses_singlecoil_kspace_and_a_missing_mask() -> None:
    transform = VarNetDataTransform()
    kspace = np.ones((4,) + KSPACE_SHAPE, np.complex64)
    with pytest.raises(DataError, match="a.h5: the VarNet needs multicoil k-space"):
        transform(kspace[0], None, None, {}, "a.h5", 0)
    with pytest.raises(DataError, match="a.h5: has no mask"):
        transform(kspace, None, None, {}, "a.h5", 0)


def test_transform_without_header_samples_every_column_range_and_crops_to_the_target() -> None:
    transform = VarNetDataTransform(RandomMaskFunc([0.5], [1]))
    kspace = np.ones((2,) + KSPACE_SHAPE, np.complex64)
    sample = transform(kspace, None, np.zeros((8, 6), np.float32), {"max": 2.0}, "a.h5", 0)
    assert sample.mask.all() and sample.crop_size == (8, 6) and sample.max_value == 2.0
