"""FL-MRCM round time over FL-MR (FedAvg) round time on the same data, measured side by side.

Both runs are set up as `federated.server.train` sets them up (same seed, sites, clients, model),
and each timed round is `federated.server.run_round` (every client's local update, then aggregation)
plus the strategy's `end_round`; evaluation, identical for both methods, is left out. Rounds of the
two methods alternate in one process. Default: train BFHI, target H (the README's FL-MRCM setting:
three source clients align with H, client H trains supervised only), `--mrcm_target images`.

    python -m bench.mrcm_overhead                    # demo: chans 16, 128, bs 4, 32 slices per client
    python -m bench.mrcm_overhead --scale paper      # chans 32, 256, bs 16, 16 slices per client

Target: FL-MRCM / FL-MR <= 1.5.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, client_summary, compare_rounds, load_average, prepare_run,  # noqa: E402
                          run_options, setup, synthetic_root, verdict)

TARGET = 1.5


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3, paper_repeats=2)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the scale's first)")
    p.add_argument("--local_bs", type=int, default=None, help="batch size (default: the scale's)")
    p.add_argument("--sample_rate", type=float, default=None,
                   help="fraction of each site's 4 training volumes (default: demo 0.5, paper 0.25)")
    p.add_argument("--mrcm_target", choices=["images", "features"], default="images")
    p.add_argument("--train_dataset", default="BFHI")
    p.add_argument("--test_dataset", default="H")
    args = p.parse_args(argv)
    scale = setup(args)
    resolution = args.resolution or scale.resolutions[0]
    sample_rate = args.sample_rate or (0.25 if scale.name == "paper" else 0.5)
    bs = args.local_bs or scale.local_bs
    root = synthetic_root(args, resolution)
    extra = ["--train_dataset", args.train_dataset, "--test_dataset", args.test_dataset, "--local_ep", "1",
             "--sample_rate", str(sample_rate), "--mrcm_target", args.mrcm_target]
    runs = {name: prepare_run(run_options(root, resolution, scale.chans, bs, strategy=name, extra=extra))
            for name in ("fedavg", "mrcm")}
    clients = runs["fedavg"].exp.clients
    print(f"scale {scale.name}: chans {scale.chans}, {resolution}x{resolution}, batch {bs}, local_ep 1, "
          f"clients {client_summary(clients)}, target "
          f"{args.test_dataset}, --mrcm_target {args.mrcm_target}; {args.repeats} timed rounds each")
    medians, line = compare_rounds(runs, args.repeats)
    ratio = medians["mrcm"] / medians["fedavg"]
    print(line)
    print(f"mrcm_overhead ({scale.name}): FL-MRCM / FL-MR = {ratio:.3f}; target <= {TARGET} -> "
          f"{verdict(ratio <= TARGET)}; load average now {load_average()}")


if __name__ == "__main__":
    main()
