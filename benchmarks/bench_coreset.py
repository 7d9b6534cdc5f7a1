"""Wall-clock time of herding and k-center greedy on a Flickr30k-sized pool of random unit features.

    .venv/bin/python benchmarks/bench_coreset.py                      # 145,000 pairs x 2304-d, budget 1000
    .venv/bin/python benchmarks/bench_coreset.py --dim 4608 --budget 100 200 500 1000

Random unit vectors are the hard case for the float16 screen (all distances concentrate), so real
embeddings select at least this fast. Prints one line per (method, budget) and the screening's share
of float64 re-scored rows.
"""

from __future__ import annotations

import argparse
import time

import torch

from baselines.herding import herding
from baselines.kcenter import kcenter_greedy


def random_pool(pairs: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(pairs, dim, generator=g)
    return features.div_(features.norm(dim=1, keepdim=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=145_000)
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--budget", type=int, nargs="+", default=[1000])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    features = random_pool(args.pairs, args.dim)
    print(f"pool {args.pairs} x {args.dim}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for budget in args.budget:
        start = time.perf_counter()
        herding(features, budget, progress=False)
        print(f"herding  budget {budget:5d}: {time.perf_counter() - start:7.1f} s")
        start = time.perf_counter()
        _, radii = kcenter_greedy(features, budget, torch.Generator().manual_seed(0), progress=False)
        print(f"k-center budget {budget:5d}: {time.perf_counter() - start:7.1f} s (covering radius {radii[-1]:.4f})")


if __name__ == "__main__":
    main()
