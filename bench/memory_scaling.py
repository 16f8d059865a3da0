"""Peak memory of reading a site's training slices: N volumes against 10 N volumes (streaming).

Each measurement is a fresh Python process (clean peak): it builds the site's training
`SliceDataset` (as `federated.experiment.site_dataset` does) over the first N or 10 N volumes and
reads every slice once through the project's DataLoader, shuffled as training reads it
(num_workers 0, the training batch size). It reports its peak RSS after imports and indexing, and
after the pass: VmHWM from /proc/self/status (`resource.getrusage` ru_maxrss would carry over the
parent's peak across fork and exec), ru_maxrss where there is no /proc. Processes for N and 10 N
alternate.

    python -m bench.memory_scaling                     # 128 x 128, N = 2 vs 20 volumes of 16 slices
    python -m bench.memory_scaling --scale paper       # 256 x 256

Target: peak RSS with 10 N volumes within 10% of the peak with N volumes, for every site.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, base_parser, load_average, med, setup, synthetic_root, verdict  # noqa: E402

TARGET = 0.10


def child(args) -> None:
    import torch

    from bench.common import run_options
    from federated.client import make_loader
    from federated.experiment import resolve_registry, site_dataset
    from federated.tasks import task_for

    root = synthetic_root(args, args.resolution, **config(args))
    opts = run_options(root, args.resolution, 16, args.local_bs)
    site = resolve_registry(opts)[0][args.site]
    files = site.files(opts.sequence, "train")[:args.volumes]
    dataset = site_dataset(task_for(opts), site, files, opts, train=True)
    before = peak_rss_kib()
    dataset.set_epoch(1)
    slices = 0
    for batch in make_loader(dataset, args.local_bs, True, torch.Generator().manual_seed(1), 0,
                             torch.device("cpu")):
        slices += len(batch.fname)
    after = peak_rss_kib()
    print(json.dumps({"volumes": len(files), "slices": slices, "before_kib": before, "peak_kib": after}))


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def config(args) -> dict:
    return dict(train=10 * args.n, val=1, test=0, slices=16, sequences=("T1",))


def run_child(args, site: str, volumes: int) -> dict:
    cmd = [sys.executable, "-m", "bench.memory_scaling", "--child", "--site", site, "--volumes", str(volumes),
           "--resolution", str(args.resolution), "--n", str(args.n), "--local_bs", str(args.local_bs)]
    if args.synthetic_dir:
        cmd += ["--synthetic_dir", args.synthetic_dir]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=2)
    p.add_argument("--n", type=int, default=2, help="N: the small dataset's volumes (the large one has 10 N)")
    p.add_argument("--sites", default="FHIB")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the scale's first)")
    p.add_argument("--local_bs", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--site", default="F", help=argparse_hidden())
    p.add_argument("--volumes", type=int, default=0, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    scale = setup(args)
    args.resolution = args.resolution or scale.resolutions[0]
    args.local_bs = args.local_bs or scale.local_bs
    synthetic_root(args, args.resolution, **config(args))  # generate once, before the children
    print(f"scale {scale.name}: {args.resolution}x{args.resolution}, N = {args.n} vs 10 N = {10 * args.n} "
          f"training volumes of 16 slices, one shuffled pass, batch {args.local_bs}; {args.repeats} "
          f"processes each, alternating")
    worst = 0.0
    for site in args.sites:
        runs: dict[int, list[dict]] = {args.n: [], 10 * args.n: []}
        for _ in range(args.repeats):
            for volumes in runs:
                runs[volumes].append(run_child(args, site, volumes))
        small = med([r["peak_kib"] for r in runs[args.n]]) / 1024
        large = med([r["peak_kib"] for r in runs[10 * args.n]]) / 1024
        base_s = med([r["before_kib"] for r in runs[args.n]]) / 1024
        base_l = med([r["before_kib"] for r in runs[10 * args.n]]) / 1024
        growth = large / small - 1
        worst = max(worst, growth)
        print(f"  site {site}: {runs[args.n][0]['slices']:4d} slices peak {small:7.1f} MiB (after indexing "
              f"{base_s:6.1f}, pass adds {small - base_s:5.1f}) | {runs[10 * args.n][0]['slices']:4d} slices "
              f"peak {large:7.1f} MiB (after indexing {base_l:6.1f}, pass adds {large - base_l:5.1f}) | "
              f"10N / N = {large / small:.3f} -> {verdict(growth <= TARGET)}", flush=True)
    print(f"memory_scaling ({scale.name}): peak RSS grows at most {worst:+.1%} from N to 10 N volumes; "
          f"target within {TARGET:.0%} -> {verdict(worst <= TARGET)}; load average now {load_average()}")


def argparse_hidden() -> str:
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
