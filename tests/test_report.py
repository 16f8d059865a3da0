"""The console's final table: baseline against the last round's model, per site."""

from utils.report import final_table


def _row(model: str, round_: int, site: str, psnr: float, ssim: float, **extra) -> dict:
    return {"round": round_, "model": model, "site": site, "split": "val", "psnr": psnr, "ssim": ssim, **extra}


def test_final_table_shows_the_last_round_and_head_ssim_when_scored() -> None:
    metrics = [_row("zero_filled", 0, "H", 27.17, 0.7034, ssim_head=0.6598),
               _row("global", 1, "H", 20.0, 0.5, ssim_head=0.5),
               _row("global", 5, "H", 28.54, 0.6764, ssim_head=0.7003),
               {"round": 5, "model": "global", "site": "H", "split": "train", "loss": 0.2}]
    lines = final_table(metrics, ["H"], "fedavg").splitlines()
    assert lines[0] == "validation, round 5 (PSNR in dB)"
    assert lines[1].split() == ["site", "zero-filled", "PSNR", "SSIM", "head", "SSIM",
                                "fedavg", "PSNR", "SSIM", "head", "SSIM"]
    assert lines[3].split() == ["H", "27.17", "0.7034", "0.6598", "28.54", "0.6764", "0.7003"]


def test_final_table_without_head_ssim_keeps_two_metrics() -> None:
    metrics = [_row("zero_filled", 0, "F", 22.96, 0.5231), _row("global", 2, "F", 26.0, 0.7903)]
    lines = final_table(metrics, ["F", "I"], "fedavg").splitlines()
    assert lines[1].split() == ["site", "zero-filled", "PSNR", "SSIM", "fedavg", "PSNR", "SSIM"]
    assert lines[3].split() == ["F", "22.96", "0.5231", "26.00", "0.7903"]
    assert lines[4].split() == ["I", "-", "-", "-", "-"]  # a site with no scores yet
