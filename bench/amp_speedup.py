"""Round time with `--amp bf16` over round time in float32, on the same data, measured side by side.

Both runs are set up as `federated.server.train` sets them up (same seed, sites, clients, model); each
timed round is `federated.server.run_round` (every client's local update, then aggregation). Rounds
of the two settings alternate in one process. bfloat16 autocast is meant for hardware with bfloat16
arithmetic (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX): the machine line says which CPU
ran it, and its bfloat16 flags are printed.

    python -m bench.amp_speedup                    # demo: chans 16, 128, bs 4, FedAvg on BFHI
    python -m bench.amp_speedup --scale paper      # chans 32, 256, bs 16

No target: the ratio says whether `--amp bf16` pays on this machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, client_summary, compare_rounds, load_average, prepare_run,  # noqa: E402
                          run_options, setup, synthetic_root)


def bf16_cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = sorted(f for f in flags.split() if f in ("avx512_bf16", "amx_bf16"))
    return ", ".join(found) or "none"


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3, paper_repeats=2)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the scale's first)")
    p.add_argument("--sample_rate", type=float, default=None,
                   help="fraction of each site's 4 training volumes (default: demo 0.5, paper 0.25)")
    p.add_argument("--strategy", default="fedavg", help="method of both runs")
    args = p.parse_args(argv)
    scale = setup(args)
    resolution = args.resolution or scale.resolutions[0]
    sample_rate = args.sample_rate or (0.25 if scale.name == "paper" else 0.5)
    root = synthetic_root(args, resolution)
    extra = ["--train_dataset", "BFHI", "--local_ep", "1", "--sample_rate", str(sample_rate)]
    runs = {amp: prepare_run(run_options(root, resolution, scale.chans, scale.local_bs, args.strategy,
                                         extra=extra + ["--amp", amp]))
            for amp in ("off", "bf16")}
    clients = runs["off"].exp.clients
    print(f"scale {scale.name}: {args.strategy}, chans {scale.chans}, {resolution}x{resolution}, batch "
          f"{scale.local_bs}, local_ep 1, clients {client_summary(clients)}; "
          f"CPU bfloat16 flags: {bf16_cpu_flags()}; {args.repeats} timed rounds each")
    medians, line = compare_rounds(runs, args.repeats)
    print(line)
    print(f"amp_speedup ({scale.name}): float32 / bf16 round time = {medians['off'] / medians['bf16']:.3f} "
          f"(above 1: --amp bf16 is faster); load average now {load_average()}")


if __name__ == "__main__":
    main()
