"""CPU benchmark: wall time of one evaluated network at the embedded-default size, and of retrieval.

    .venv/bin/python benchmarks/bench_evaluate.py                 # full protocol: epochs 0..100, test every 10
    .venv/bin/python benchmarks/bench_evaluate.py --epochs 10 --threads 1
    .venv/bin/python benchmarks/bench_evaluate.py --compare-stacked 5 --epochs 10 --threads 1   # vs stacked
    .venv/bin/pytest benchmarks/bench_evaluate.py --benchmark-enable

Embedded-default size = timm `test_nfnet` at 32 px (random init), 100 synthetic pairs with 384-d texts
(MiniLM width) and a learned-looking similarity, 500 test images x 2,500 captions. The data are
random: the cost of the protocol does not depend on what the pixels show. The network is trained by
`lors.evaluation.protocol.train_networks_on_set`, the code path every evaluation runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from lors.config import Params
from lors.evaluation.protocol import train_networks_on_set
from lors.evaluation import parse_arch
from lors.evaluation.stacked import seeded_members, train_stacked
from lors.evaluation.train import RetrievalSplit
from lors.models import build_dual_encoder
from lors.runtime import member_seed
from lors.synset import SyntheticSet


def bench_params(epochs: int, eval_every: int) -> Params:
    return Params.model_validate({
        "device": "cpu", "grid": {"datasets": ["embedded"]},
        "datasets": {"embedded": {"kind": "embedded", "image_size": 32}},
        "text_encoder": {"name": "minilm", "pooling": "mean"},
        "model": {"image_encoder": "test_nfnet", "pretrained": False},
        "evaluate": {"num_eval": 1, "default": {"epochs": epochs, "eval_every": eval_every}},
        "tracking": {"enabled": False}})


def random_inputs(pairs: int = 100, size: int = 32, dim: int = 384, test_images: int = 500,
                  captions_per_image: int = 5, device: torch.device = torch.device("cpu"),
                  seed: int = 0) -> tuple[SyntheticSet, RetrievalSplit]:
    """A set with a learned-looking similarity and a test split of random pixels and caption features."""
    g = torch.Generator().manual_seed(seed)
    similarity = torch.eye(pairs) + 0.05 * torch.randn(pairs, pairs, generator=g)
    synset = SyntheticSet(torch.randn(pairs, 3, size, size, generator=g), torch.randn(pairs, dim, generator=g),
                          similarity, lr_img=0.1, lr_txt=0.1)
    test = RetrievalSplit.upload(torch.randint(0, 256, (test_images, 3, size, size), generator=g, dtype=torch.uint8),
                                 torch.randn(test_images * captions_per_image, dim, generator=g),
                                 torch.arange(test_images).repeat_interleave(captions_per_image), device)
    return synset, test


def time_one_network(epochs: int = 100, eval_every: int = 10) -> dict:
    params = bench_params(epochs, eval_every)
    synset, test = random_inputs()
    start = time.perf_counter()
    (net,) = train_networks_on_set(params, parse_arch(None, params), synset, synset.texts, {"test": test},
                                   params.evaluate.default, progress=False)
    return {"wall_s": time.perf_counter() - start, "train_s": net["train_s"], "eval_s": net["eval_s"],
            "evaluations": len(net["epochs"]), "epochs": epochs + 1}


def time_sequential_and_stacked(networks: int, epochs: int, eval_every: int) -> dict[str, float]:
    """Wall time of `networks` networks trained one after another (the stage's path) and stacked."""
    params = bench_params(epochs, eval_every)
    arch = parse_arch(None, params)
    synset, test = random_inputs()
    start = time.perf_counter()
    train_networks_on_set(params, arch, synset, synset.texts, {"test": test}, params.evaluate.default,
                          num_eval=networks, progress=False)
    sequential = time.perf_counter() - start

    def build():
        return build_dual_encoder(arch.image_encoder, synset.texts.shape[1], False, params.model.temperature,
                                  params.model.text_head_dropout)

    start = time.perf_counter()
    members = seeded_members(build, [member_seed(params.seed, k) for k in range(networks)])
    curves = train_stacked(members, synset.images, synset.texts, synset.similarity, lr_img=synset.lr_img,
                           lr_txt=synset.lr_txt, settings=params.evaluate.default, amp=params.evaluate.amp,
                           splits={"test": test},
                           device=torch.device("cpu"), progress=False)
    return {"sequential_s": sequential, "stacked_s": time.perf_counter() - start,
            "stacked_train_s": curves[0]["train_s"] * networks, "stacked_eval_s": sum(c["eval_s"] for c in curves)}


@pytest.mark.benchmark(group="evaluate")
def test_one_network_ten_epochs(benchmark):
    result = benchmark.pedantic(time_one_network, kwargs={"epochs": 9, "eval_every": 5}, rounds=1, iterations=1)
    assert result["evaluations"] == 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compare-stacked", type=int, default=0, metavar="N",
                        help="time N networks trained one after another and stacked (3 runs each, medians)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_stacked:
        runs = [time_sequential_and_stacked(args.compare_stacked, args.epochs, args.eval_every) for _ in range(3)]
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.compare_stacked} networks, "
              f"epochs 0..{args.epochs}, test every {args.eval_every}; medians of 3 runs: sequential "
              f"{median['sequential_s']:.1f} s, stacked {median['stacked_s']:.1f} s (training "
              f"{median['stacked_train_s']:.1f} s + retrieval {median['stacked_eval_s']:.1f} s) -> "
              f"{median['sequential_s'] / median['stacked_s']:.2f}x")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; test_nfnet 32 px, 100 pairs, "
          f"500 test images / 2,500 captions")
    time_one_network(epochs=1, eval_every=1)  # warm-up: first-call allocations and kernel selection
    r = time_one_network(args.epochs, args.eval_every)
    print(f"one network, epochs 0..{args.epochs} ({r['epochs']} passes, {r['evaluations']} test retrievals): "
          f"{r['wall_s']:.1f} s wall = {r['train_s']:.1f} s training ({1000 * r['train_s'] / r['epochs']:.0f} ms/epoch) "
          f"+ {r['eval_s']:.1f} s retrieval ({1000 * r['eval_s'] / r['evaluations']:.0f} ms/test pass)")


if __name__ == "__main__":
    main()
