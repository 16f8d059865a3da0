"""pFLSynth's generator, discriminator, losses, the paired-contrast data they train on and the metrics."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from data.paired import ContrastSliceDataset, check_contrasts, match_subjects, subject_name
from data.translation import Translation, parse_translation, translation
from data.sites import Site
from federated.site_discriminators import SiteDiscriminators
from models.patchgan import PatchDiscriminator
from models.pflsynth import PersonalizedGenerator, ResnetGenerator, is_shared, task_code
from models.synthesis_losses import (SynthesisHyperparameters, constant_then_linear_decay, discriminator_loss,
                                     generator_loss, make_adam)
from tests.helpers_data import write_fastmri, write_h5_image, write_nifti
from utils.errors import DataError, UserError
from tests.test_metrics import head_phantom
from utils.metrics import head_mask
from utils.synthesis_metrics import synthesis_metrics, unit_range

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def pflsynth_generator_keys() -> set[str]:
    """pFLSynth's ``personalized_generator`` state_dict keys (--norm batch, dropout on, 6 mapping
    layers), written out from its networks.py."""
    keys = {"model_1.1.weight", *(f"model_1.2.{k}" for k in BN)}
    for stage in ("model_2", "model_3", "model_13", "model_14"):
        keys |= {f"{stage}.0.weight", *(f"{stage}.1.{k}" for k in BN)}
    for block in range(4, 13):
        keys |= {f"model_{block}.conv_block.1.weight", f"model_{block}.conv_block.6.weight",
                 *(f"model_{block}.conv_block.{i}.{k}" for i in (2, 7) for k in BN)}
    keys |= {"model_15.1.weight", "model_15.1.bias"}
    keys |= {f"mapper.map.dense{i}.{k}" for i in range(6) for k in ("weight", "bias")}
    for i in range(14):
        keys |= {f"personalization_blocks.{i}.adain.style_mod.lin.weight",
                 f"personalization_blocks.{i}.adain.style_mod.lin.bias",
                 f"personalization_blocks.{i}.adacw.fc.0.weight", f"personalization_blocks.{i}.adacw.fc.2.weight"}
    return keys


# The paper's split as train_pflsynth.py aggregates it: residual blocks 6-9, the decoder, the mapper.
PAPER_SHARED_MODULES = {"model_9", "model_10", "model_11", "model_12", "model_13", "model_14", "model_15", "mapper"}


@pytest.fixture(scope="module")
def full_generator() -> PersonalizedGenerator:
    torch.manual_seed(0)
    return PersonalizedGenerator(num_sites=4)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_generators_have_pflsynth_keys_and_parameter_counts(full_generator) -> None:
    assert set(full_generator.state_dict()) == pflsynth_generator_keys()
    assert n_params(full_generator) == 15_986_817
    plain = ResnetGenerator()
    assert set(plain.state_dict()) == {k for k in pflsynth_generator_keys() if k.startswith("model_")}
    assert n_params(plain) == 15_986_817 - 1_319_936 - 3_296_000  # without mapper and 14 blocks


def test_shared_keys_are_the_papers_split_and_about_40_percent(full_generator) -> None:
    shared = is_shared()
    state = full_generator.state_dict()
    assert {k for k in state if shared(k)} == {k for k in state if k.split(".")[0] in PAPER_SHARED_MODULES}
    assert not any(shared(k) for k in state if k.startswith("personalization_blocks."))
    shared_params = sum(p.numel() for k, p in full_generator.named_parameters() if shared(k))
    assert shared_params == 6_414_785
    assert shared_params / n_params(full_generator) == pytest.approx(0.4013, abs=1e-4)


def test_discriminator_keys_are_never_shared() -> None:
    disc = PatchDiscriminator()
    assert n_params(disc) == 2_764_609
    assert not any(is_shared()(k) for k in disc.state_dict())


def test_discriminator_scores_patches_of_the_conditional_pair() -> None:
    disc = PatchDiscriminator(ndf=8).eval()
    source, image = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    logits = disc(source, image)
    assert logits.shape == (2, 1, 6, 6)
    assert not torch.allclose(logits, disc(torch.rand(2, 1, 64, 64), image))  # the source conditions it


def small_generator(seed: int = 0) -> PersonalizedGenerator:
    torch.manual_seed(seed)
    return PersonalizedGenerator(num_sites=3, ngf=8, n_blocks=2)


def test_output_depends_on_site_and_task_codes() -> None:
    model = small_generator().eval()
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        base = model(image, task_code(0, 3, 0, 1))
        for other in (task_code(1, 3, 0, 1), task_code(0, 3, 1, 2), task_code(0, 3, 0, 2)):
            assert (model(image, other) - base).abs().max() > 1e-3
        torch.testing.assert_close(model(image, task_code(0, 3, 0, 1)), base, rtol=0, atol=0)


def test_eval_mode_is_deterministic_and_train_mode_is_not() -> None:
    model = small_generator()
    image, code = torch.rand(2, 1, 32, 32), task_code(2, 3, 1, 0)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(image, code), model(image, code))  # dropout
        model.eval()
        assert torch.equal(model(image, code), model(image, code))


def test_task_code_is_pflsynths_one_hot_layout() -> None:
    # pFLSynth's example codes: IXI (site 0) T2 -> PD, BRATS (site 1) FLAIR -> T2.
    assert task_code(0, 4, 1, 2).tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    assert task_code(1, 4, 3, 1).tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]


def test_losses_are_lsgan_and_weighted_l1() -> None:
    logits = torch.full((1, 1, 4, 4), 0.5)
    assert discriminator_loss(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 0
    assert discriminator_loss(logits, logits).item() == pytest.approx(0.5 * (0.25 + 0.25))
    fake, target = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.1)
    total, parts = generator_loss(logits, fake, target)
    assert parts["g_adv"].item() == pytest.approx(0.25)
    assert parts["g_l1"].item() == pytest.approx(100 * 0.1)
    assert total.item() == pytest.approx(0.25 + 10.0)


def test_adam_and_schedule_defaults() -> None:
    hp = SynthesisHyperparameters()
    optimizer = make_adam([torch.nn.Parameter(torch.zeros(1))], hp)
    assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["betas"] == (0.5, 0.999)
    factor = constant_then_linear_decay(optimizer, hp).lr_lambdas[0]  # of round 0, 1, ...
    assert [factor(r) for r in range(75)] == [1.0] * 75
    assert factor(75) == pytest.approx(75 / 76) and factor(149) == pytest.approx(1 / 76)


# -- paired data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, contrast, subject", [
    ("IXI002-Guys-0828-T1.nii.gz", "T1", "IXI002-Guys-0828"),
    ("BraTS20_Training_001_flair.nii.gz", "FLAIR", "BraTS20_Training_001"),
    ("synthI_train_000_PD.h5", "PD", "synthI_train_000"),
    ("subject7.nii", "T2", "subject7"),
    ("patient_T1w.nii.gz", "T1", "patient_T1w"),
])
def test_subject_name_strips_suffix_and_contrast_tag(name: str, contrast: str, subject: str) -> None:
    assert subject_name(Path(name), contrast) == subject


def volume(seed: int, slices: int = 3) -> np.ndarray:
    """(16, 16, slices) float32 with a different intensity range on every slice."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (16, 16, slices)) * np.arange(1, slices + 1)).astype(np.float32)


@pytest.fixture
def nifti_site(tmp_path: Path) -> Site:
    """T1 for subjects a, b, c; T2 for a, b, d (T2 = 3 * T1 + 5 for the shared ones); PD for a."""
    for subject in "abc":
        write_nifti(tmp_path / "T1" / "train" / f"{subject}_T1.nii.gz", volume(ord(subject)))
    for subject in "abd":
        write_nifti(tmp_path / "T2" / "train" / f"{subject}-t2.nii.gz", 3 * volume(ord(subject)) + 5)
    write_nifti(tmp_path / "PD" / "train" / "a.nii", volume(7))
    return Site("X", tmp_path, "nifti")


def test_matches_subjects_and_names_the_skipped(nifti_site: Site) -> None:
    matching = match_subjects(nifti_site, ["T1", "T2"], "train")
    assert [s.name for s in matching.subjects] == ["a", "b"]
    assert matching.skipped == ["c", "d"]
    dataset = ContrastSliceDataset(nifti_site, matching.subjects, ["T1", "T2"])
    assert len(dataset) == 6
    for i in range(len(dataset)):
        sample = dataset[i]
        raw = volume(ord(sample.subject))[:, :, sample.slice_num]
        assert sample.ranges["T1"] == pytest.approx((raw.min(), raw.max()))
        assert sample.ranges["T2"] == pytest.approx((3 * raw.min() + 5, 3 * raw.max() + 5), rel=1e-5)
        # T2 is an affine map of T1, so both min-max scale to the same slice in [-1, 1].
        np.testing.assert_allclose(sample.images["T2"], sample.images["T1"], atol=1e-5)
        assert sample.images["T1"].min() == -1 and sample.images["T1"].max() == pytest.approx(1)
    three = match_subjects(nifti_site, ["T1", "T2", "PD"], "train")
    assert [s.name for s in three.subjects] == ["a"] and three.skipped == ["b", "c", "d"]


def test_sample_seed_follows_the_epoch(nifti_site: Site) -> None:
    dataset = ContrastSliceDataset(nifti_site, match_subjects(nifti_site, ["T1", "T2"], "train").subjects,
                                   ["T1", "T2"])
    assert dataset[4].seed is None
    dataset.set_epoch(7)
    assert dataset[4].seed == (7, 1, ord("b"))


def test_matches_hdf5_stacks_and_fastmri_targets(tmp_path: Path) -> None:
    stack = np.moveaxis(volume(1), -1, 0)
    write_h5_image(tmp_path / "img" / "T1" / "val" / "s1_T1.h5", stack)
    write_h5_image(tmp_path / "img" / "T2" / "val" / "s1_T2.h5", stack * 2)
    site = Site("S", tmp_path / "img", "h5_image")
    subjects = match_subjects(site, ["T1", "T2"], "val").subjects
    sample = ContrastSliceDataset(site, subjects, ["T1", "T2"], resolution=20)[2]
    assert sample.images["T1"].shape == (20, 20) and sample.ranges["T2"][1] == pytest.approx(2 * stack[2].max())
    for contrast in ("T1", "FLAIR"):
        write_fastmri(tmp_path / "fm" / contrast / "test" / f"p1_{contrast}.h5", num_slices=2)
    site = Site("F", tmp_path / "fm", "fastmri_h5")
    dataset = ContrastSliceDataset(site, match_subjects(site, ["T1", "FLAIR"], "test").subjects, ["T1", "FLAIR"])
    assert [dataset[i].ranges["FLAIR"] for i in range(2)] == [(1.0, 1.0), (2.0, 2.0)]  # reconstruction_esc


@pytest.mark.parametrize("text, expected", [("T1->T2", ("T1", "T2")), (" FLAIR -> T2 ", ("FLAIR", "T2")),
                                            ("T1-Gd->PD", ("T1-Gd", "PD"))])
def test_parse_translation(text: str, expected: tuple[str, str]) -> None:
    assert parse_translation(text, "sites file s.json, site 'I'") == expected


@pytest.mark.parametrize("text, message", [("T1T2", "not of the form SOURCE->TARGET"),
                                           ("T1->", "not of the form"), ("T2->T2", "both T2")])
def test_bad_translation_is_a_user_error_naming_where(text: str, message: str) -> None:
    with pytest.raises(UserError, match=rf"^sites file s.json, site 'I': .*{message}"):
        parse_translation(text, "sites file s.json, site 'I'")


def test_same_source_and_target_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--source_contrast/--target_contrast: source and target contrast are both T2"):
        translation("T2", "T2", "--source_contrast/--target_contrast")


def test_missing_contrast_names_the_ones_the_site_has(nifti_site: Site) -> None:
    check_contrasts(nifti_site, [Translation("T1", "T2"), Translation("T2", "PD")])
    with pytest.raises(UserError, match=r"synthesis T1->FLAIR: .*no FLAIR folder .*\(its contrasts: PD, T1, T2\)"):
        check_contrasts(nifti_site, [Translation("T1", "T2"), Translation("T1", "FLAIR")])


def test_site_without_matched_subjects_is_a_data_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "T1" / "train" / "a_T1.nii", volume(0))
    write_nifti(tmp_path / "T2" / "train" / "b_T2.nii", volume(1))
    with pytest.raises(DataError, match="no subject has all of T1, T2"):
        match_subjects(Site("Y", tmp_path, "nifti"), ["T1", "T2"], "train")


def test_unregistered_contrasts_are_a_data_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "T1" / "train" / "a_T1.nii", volume(0, slices=3))
    write_nifti(tmp_path / "T2" / "train" / "a_T2.nii", volume(0, slices=4))
    site = Site("Z", tmp_path, "nifti")
    with pytest.raises(DataError, match="has 3 slices but .* has 4"):
        ContrastSliceDataset(site, match_subjects(site, ["T1", "T2"], "train").subjects, ["T1", "T2"])


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_use_the_targets_range_and_separate_the_background() -> None:
    target = head_phantom()
    scores = synthesis_metrics(1000 * target, 1000 * target)
    assert scores["psnr"] == np.inf and scores["ssim"] == pytest.approx(1.0)
    wrong_background = target.copy()
    wrong_background[~head_mask(unit_range(target, target))] += 0.3
    scores = synthesis_metrics(target, wrong_background)
    assert scores["psnr"] < 20 and scores["psnr_head"] == np.inf
    assert scores["ssim"] < scores["ssim_head"] - 0.1
    noisy = target + np.random.default_rng(1).normal(0, 0.05, target.shape)
    scaled = unit_range(target, target), unit_range(noisy, target)
    assert synthesis_metrics(target, noisy)["psnr"] == pytest.approx(peak_signal_noise_ratio(*scaled, data_range=1))
    assert synthesis_metrics(5 * target, 5 * noisy)["psnr"] == pytest.approx(synthesis_metrics(target, noisy)["psnr"])


# -- the GAN step -----------------------------------------------------------------------------


def tiny_gan(seed: int = 0) -> tuple[PersonalizedGenerator, SiteDiscriminators]:
    torch.manual_seed(seed)
    generator = PersonalizedGenerator(num_sites=2, ngf=4, n_blocks=1, mapping_layers=2)
    discs = SiteDiscriminators(2, lambda: PatchDiscriminator(ndf=4, n_layers=2), SynthesisHyperparameters(),
                               torch.device("cpu"))
    return generator, discs


def gan_step(generator, discs, task: torch.Tensor, source, target) -> None:
    synthesised = generator(source, torch.stack([task_code(int(t), 2, 0, 1) for t in task]))
    discs.step(source, target, synthesised, task)
    assert all(p.grad is None for p in generator.parameters())  # the discriminator step stops at the image
    loss, _ = discs.generator_loss(source, target, synthesised, task)
    generator.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for d in discs.discriminators for p in d.parameters() if p.requires_grad)


def test_discriminator_step_updates_only_its_tasks_discriminator() -> None:
    generator, discs = tiny_gan()
    before = [copy.deepcopy(d.state_dict()) for d in discs.discriminators]
    source, target = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    gan_step(generator, discs, torch.tensor([1, 1]), source, target)
    assert any(p.grad is not None for p in generator.parameters())
    changed = [any(not torch.equal(v, d.state_dict()[k]) for k, v in b.items())
               for b, d in zip(before, discs.discriminators)]
    assert changed == [False, True]


def test_mixed_task_batch_scores_each_sample_with_its_tasks_discriminator() -> None:
    _, discs = tiny_gan()
    source, target, fake = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    task = torch.tensor([1, 0, 1])
    d0, d1 = (copy.deepcopy(d) for d in discs.discriminators)
    rows = {0: [1], 1: [0, 2]}
    by_task = {t: d(source[r], target[r]) for t, (d, r) in zip(rows, ((d0, rows[0]), (d1, rows[1])))}
    fakes = {t: d(source[r], fake[r]) for t, (d, r) in zip(rows, ((d0, rows[0]), (d1, rows[1])))}
    expected = sum(0.5 * (((by_task[t] - 1) ** 2).mean() + (fakes[t] ** 2).mean()) * len(rows[t]) / 3 for t in rows)
    torch.testing.assert_close(discs.step(source, target, fake, task), expected.detach())
    assert all(any(p.grad is not None for p in d.parameters()) for d in discs.discriminators)


def test_discriminator_state_round_trips() -> None:
    generator, discs = tiny_gan()
    source, target = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    gan_step(generator, discs, torch.tensor([0, 1]), source, target)
    discs.end_round()
    _, restored = tiny_gan(seed=1)
    restored.load_state_dict(copy.deepcopy(discs.state_dict()))
    fake, task = torch.rand(2, 1, 16, 16), torch.tensor([0, 0])
    torch.testing.assert_close(restored.step(source, target, fake, task), discs.step(source, target, fake, task))
    assert restored.optimizers[0].param_groups[0]["lr"] == discs.optimizers[0].param_groups[0]["lr"]


# -- the task on the runner -------------------------------------------------------------------

TINY_SYNTHESIS = ["--task", "synthesis", "--epochs", "1", "--local_ep", "1", "--local_bs", "4", "--ngf", "4",
                  "--ndf", "4", "--n_blocks", "2", "--mapping_layers", "2", "--resolution", "32", "--quiet"]


def synthesis_run(root: Path, save_dir: Path, *extra: str) -> list[str]:
    return [*TINY_SYNTHESIS, "--data_root", str(root), "--save_dir", str(save_dir), *extra]


def test_pflsynth_round_keeps_blocks_and_discriminators_local(tiny_root, tmp_path) -> None:
    from tests.conftest import run_cli
    from utils.checkpoint import load_checkpoint
    args = synthesis_run(tiny_root, tmp_path / "run", "--strategy", "pflsynth", "--pflsynth_shared_blocks", "1",
                         "--train_dataset", "BI", "--test_dataset", "I")
    assert run_cli(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    model_keys = set(PersonalizedGenerator(2, ngf=4, n_blocks=2, mapping_layers=2).state_dict())
    shared = {k for k in model_keys if k.split(".")[0] in {"model_5", "model_6", "model_7", "model_8", "mapper"}}
    assert set(ckpt["model"]) == model_keys  # no discriminator in the global state
    for client in ckpt["clients"].values():
        assert set(client["local_weights"]) == model_keys - shared
        assert len(client["extra"]["discriminators"]["discriminators"]) == 1  # one task per site
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("0,identity,I,val,") for r in rows) and "ssim_head" in rows[0]

    test_args = ["--phase", "test", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--data_root",
                 str(tiny_root), "--quiet"]
    for i in (1, 2):
        assert run_cli([*test_args, "--save_dir", str(tmp_path / f"test{i}")]) == 0
    assert (tmp_path / "test1" / "test" / "metrics.csv").read_text() == \
        (tmp_path / "test2" / "test" / "metrics.csv").read_text()


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedbn", "fedmri", "local", "central"])
def test_methods_run_a_round_on_the_plain_generator(tiny_root, tmp_path, strategy: str) -> None:
    from tests.conftest import run_cli
    assert run_cli(synthesis_run(tiny_root, tmp_path / "run", "--strategy", strategy, "--train_dataset", "BI",
                                 "--test_dataset", "I")) == 0


@pytest.mark.parametrize("extra, needles", [
    (["--strategy", "pflsynth", "--source_contrast", "T2"], ["--source_contrast/--target_contrast", "both T2"]),
    (["--strategy", "fedavg", "--target_contrast", "FLAIR"], ["no FLAIR folder", "its contrasts: PD, T1, T2"]),
])
def test_bad_synthesis_input_is_one_line(capsys, tiny_root, tmp_path, extra, needles) -> None:
    from tests.conftest import run_cli
    code = run_cli(synthesis_run(tiny_root, tmp_path / "run", "--train_dataset", "I", "--test_dataset", "I", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert not (tmp_path / "run").exists()


def test_pflsynth_needs_the_synthesis_task(capsys, tiny_root, tmp_path) -> None:
    from tests.conftest import TINY_RUN, run_cli
    assert run_cli([*TINY_RUN, "--strategy", "pflsynth", "--data_root", str(tiny_root)]) == 2
    assert "add --task synthesis" in capsys.readouterr().err


def variable_task_sites(root: Path, folder: Path, tasks: dict[str, list]) -> Path:
    """A sites file for ``root``'s sites with per-site "tasks" (pFLSynth's variable-task setting)."""
    import json
    sites = json.loads((root / "sites.json").read_text())["sites"]
    entries = {name: {**sites[name], "root": str(root / sites[name]["root"]), "tasks": t} for name, t in tasks.items()}
    path = folder / "sites.json"
    path.write_text(json.dumps({"sites": entries}))
    return path


def test_variable_tasks_train_one_discriminator_per_site_task(tiny_root, tmp_path) -> None:
    from tests.conftest import run_cli
    from utils.checkpoint import load_checkpoint
    sites = variable_task_sites(tiny_root, tmp_path, {"I": ["T1->T2", "T2->PD"], "B": ["T1->T2", "FLAIR->T2"]})
    args = [*TINY_SYNTHESIS, "--sites", str(sites), "--save_dir", str(tmp_path / "run"), "--strategy", "pflsynth",
            "--pflsynth_shared_blocks", "1", "--train_dataset", "I,B", "--test_dataset", "I", "--local_bs", "1"]
    assert run_cli(args) == 0
    clients = load_checkpoint(tmp_path / "run" / "last.pt")["clients"]
    for name in ("I", "B"):
        discriminators = clients[name]["extra"]["discriminators"]
        assert len(discriminators["discriminators"]) == 2
        assert all(o["state"] for o in discriminators["optimizers"])  # both tasks were drawn and trained


@pytest.mark.parametrize("tasks, needles", [(["T1->T2", "T1T2"], ["site 'I', tasks", "'T1T2' is not of the form"]),
                                            (["T1->FLAIR"], ["no FLAIR folder", "its contrasts: PD, T1, T2"]),
                                            (["T1->T1ce"], ["contrast T1ce has no place in the task code"])])
def test_bad_site_tasks_are_one_line(capsys, tiny_root, tmp_path, tasks, needles) -> None:
    from tests.conftest import run_cli
    sites = variable_task_sites(tiny_root, tmp_path, {"I": tasks})
    code = run_cli([*TINY_SYNTHESIS, "--sites", str(sites), "--save_dir", str(tmp_path / "run"),
                    "--train_dataset", "I", "--test_dataset", "I"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert not (tmp_path / "run").exists()


def test_variable_task_sites_are_scored_and_written_per_task(tiny_root, tmp_path) -> None:
    import csv
    import nibabel as nib
    from tests.conftest import run_cli
    args = [*TINY_SYNTHESIS, "--data_root", str(tiny_root), "--save_dir", str(tmp_path / "run"), "--strategy",
            "pflsynth", "--pflsynth_shared_blocks", "1", "--train_dataset", "I,F", "--test_dataset", "I",
            "--local_bs", "1", "--site_tasks", "I=T1->T2,T2->PD", "F=T2->T1"]
    assert run_cli(args) == 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        val = [(r["round"], r["model"], r["site"], r["task"]) for r in csv.DictReader(f) if r["split"] == "val"]
    assert set(val) == {("0", "identity", "I", "T1->T2"), ("0", "identity", "I", "T2->PD"),
                        ("0", "identity", "F", "T2->T1"), ("1", "I", "I", "T1->T2"), ("1", "I", "I", "T2->PD"),
                        ("1", "F", "F", "T2->T1")}

    # --phase test evaluates every client's model on the test site, in each of the site's translations.
    test_args = ["--phase", "test", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--data_root", str(tiny_root),
                 "--quiet"]
    assert run_cli([*test_args, "--save_dir", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "test"
    with open(out / "metrics.csv", newline="") as f:
        tested = {(r["model"], r["site"], r["task"]) for r in csv.DictReader(f)}
    assert tested == {(m, "I", t) for m in ("identity", "I", "F") for t in ("T1->T2", "T2->PD")}
    recons = out / "reconstructions"
    niftis = sorted(recons.glob("I-on-I/T2-to-PD/*.nii.gz"))  # I is an image (NIfTI) site
    reference = nib.load(sorted((tiny_root / "I" / "PD" / "test").glob("*.nii.gz"))[0])
    assert niftis and nib.load(niftis[0]).shape[2] == reference.shape[2]
    assert sorted(recons.glob("F-on-I/T1-to-T2/*.nii.gz"))
    assert (out / "figures" / "I-on-I.png").is_file() and (out / "figures" / "F-on-I.png").is_file()

    # On F, its own translation (--site_tasks is recorded in the checkpoint), written as HDF5.
    assert run_cli([*test_args, "--test_dataset", "F", "--save_dir", str(tmp_path / "on-F")]) == 0
    with open(tmp_path / "on-F" / "test" / "metrics.csv", newline="") as f:
        tested = {(r["model"], r["site"], r["task"]) for r in csv.DictReader(f)}
    assert tested == {(m, "F", "T2->T1") for m in ("identity", "I", "F")}
    assert sorted((tmp_path / "on-F" / "test" / "reconstructions").glob("F-on-F/T2-to-T1/*.h5"))


def test_bad_site_tasks_flag_is_one_line(capsys, tiny_root, tmp_path) -> None:
    from tests.conftest import run_cli
    code = run_cli(synthesis_run(tiny_root, tmp_path / "run", "--train_dataset", "I", "--test_dataset", "I",
                                 "--site_tasks", "I:T1->T2"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--site_tasks 'I:T1->T2'" in err, err
    assert not (tmp_path / "run").exists()
