"""FL-MR: federated U-Net training with FedAvg (Guo et al., CVPR 2021). `--help` lists the options."""
import sys

from federated.cli import main

if __name__ == "__main__":
    sys.exit(main(None, "main_fl_mr.py", "fedavg",
                  "Train a U-Net across MRI sites with FedAvg (FL-MR), or test a checkpoint."))
