"""--amp bf16: forward passes run in bfloat16, everything stored stays float32, and every path that
runs a model (local updates, FL-MRCM's discriminator step, evaluation, the test phase) works with it."""
from __future__ import annotations

import argparse

import pytest
import torch

from federated.precision import autocast
from models.unet import Unet
from tests.conftest import TINY_RUN, run_cli
from tests.test_fl_mr import final_weights, read_metrics


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_sets_the_forward_dtype(amp, dtype):
    model = Unet(in_chans=1, out_chans=1, chans=4, num_pool_layers=2)
    with autocast(argparse.Namespace(amp=amp), torch.device("cpu")):
        out = model(torch.randn(2, 1, 32, 32))
    assert out.dtype == dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_forward_is_close_to_float32():
    torch.manual_seed(0)
    model = Unet(in_chans=1, out_chans=1, chans=8, num_pool_layers=2).eval()
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        full = model(image)
        with autocast(argparse.Namespace(amp="bf16"), torch.device("cpu")):
            half = model(image).float()
    # bfloat16 keeps 8 bits of mantissa: about 2-3 significant digits through a few layers.
    assert (half - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.parametrize("prog, strategy", [("main_fl_mr.py", "fedavg"), ("main_fl_mrcm.py", "mrcm")])
def test_bf16_run_trains_evaluates_and_tests_in_float32_storage(tiny_root, tmp_path, prog, strategy):
    save = tmp_path / "run"
    args = ["--data_root", str(tiny_root), *TINY_RUN]
    if strategy == "mrcm":
        args += ["--train_dataset", "FHI", "--num_users", "3", "--test_dataset", "B"]
    assert run_cli(args + ["--amp", "bf16", "--save_dir", str(save)], prog, strategy) == 0
    weights = final_weights(save)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    val = [r for r in read_metrics(save) if r["split"] == "val" and r["psnr"]]
    assert val and all(float(r["psnr"]) == float(r["psnr"]) for r in val)  # not NaN
    # The flag reaches training: the same run in float32 ends with other weights.
    assert run_cli(args + ["--save_dir", str(tmp_path / "fp32")], prog, strategy) == 0
    assert any(not torch.equal(v, final_weights(tmp_path / "fp32")[k]) for k, v in weights.items())
    assert run_cli(["--data_root", str(tiny_root), "--quiet", "--amp", "bf16", "--phase", "test",
                    "--checkpoint", str(save / "last.pt"), "--save_dir", str(save)], prog, strategy) == 0
    assert any((save / "test" / "reconstructions").rglob("*.h5"))


def test_runs_saved_before_the_flag_existed_continue(tiny_root, tmp_path):
    import json
    save = tmp_path / "run"
    assert run_cli(["--data_root", str(tiny_root), *TINY_RUN, "--save_dir", str(save)]) == 0
    options = json.loads((save / "options.json").read_text())
    del options["amp"]
    (save / "options.json").write_text(json.dumps(options))
    assert run_cli(["--resume", str(save), "--epochs", "2", "--amp", "bf16", "--quiet"]) == 0
    assert torch.load(save / "last.pt", weights_only=True)["options"]["amp"] == "bf16"
    assert {r["round"] for r in read_metrics(save)} >= {"1", "2"}
