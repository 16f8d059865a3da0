"""FL-MRCM: federated U-Net training with cross-site latent alignment to a target site (Guo et al.,
CVPR 2021). `--help` lists the options."""
import sys

from federated.cli import main

if __name__ == "__main__":
    sys.exit(main(None, "main_fl_mrcm.py", "mrcm",
                  "Train a U-Net across MRI sites with FL-MRCM (FedAvg + adversarial alignment of "
                  "latent features to the target site), or test a checkpoint."))
