"""CPU throughput of the expert train step, augmentation included (embedded-default size).

test_nfnet at 32 px, batch 128, 384-d text features (MiniLM width): the step the experts stage runs
on a laptop. Either
    .venv/bin/python benchmarks/bench_experts.py --steps 5
or  .venv/bin/pytest benchmarks/bench_experts.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from lors.experts import make_expert_optimizer, train_contrastive_epoch
from lors.models import build_dual_encoder

IMAGE_SIZE, BATCH, TEXT_DIM = 32, 128, 384


def expert_epoch(steps: int, augment: bool = True, image_size: int = IMAGE_SIZE, batch: int = BATCH) -> Callable[[], float]:
    """A closure running one epoch of `steps` train steps on random uint8 data."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch * steps, 3, image_size, image_size), dtype=np.uint8)
    texts = torch.randn(batch * steps, TEXT_DIM)
    txt2img = np.arange(batch * steps)
    torch.manual_seed(0)
    model = build_dual_encoder("test_nfnet", TEXT_DIM, pretrained=False)
    optimizer = make_expert_optimizer(model, 0.1, 0.1)
    generator = torch.Generator().manual_seed(0)
    return lambda: train_contrastive_epoch(model, optimizer, images, texts, txt2img, batch_size=batch,
                                           generator=generator, device=torch.device("cpu"), augment=augment)


def test_expert_train_step(benchmark):
    benchmark.extra_info["images_per_round"] = BATCH
    benchmark.pedantic(expert_epoch(1), rounds=5, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for augment in (True, False):
        run = expert_epoch(args.steps, augment)
        run()  # warm-up: oneDNN picks kernels on first use
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        print(f"augment={augment}: {args.steps * BATCH / elapsed:,.0f} img/s "
              f"({elapsed / args.steps * 1000:.0f} ms/step, {args.threads} threads)")


if __name__ == "__main__":
    main()
