"""GPU timing of the evaluation protocol at the paper's size (NFNet-L0, 224 px, 768-d BERT-width texts).

    python benchmarks/gpu_evaluate.py                          # 99 and 499 pairs, Flickr30k test size
    python benchmarks/gpu_evaluate.py --pairs 499 --test-images 5000 --extra-captions 10   # COCO 5k test
    python benchmarks/gpu_evaluate.py --image-encoder test_nfnet --size 32 --epochs 2 --device cpu  # smoke

Random weights and random data (no hub download; the cost does not depend on the values). Prints,
per set size, the wall time of one evaluated network (epochs 0..E, test retrieval every 10) split into
training and retrieval, and the time of one test pass (image encoding in bf16 autocast when --amp,
text head, blocked ranking). Reference cost for scale: one expert step of the same network at batch
128 takes 0.113 s on an H100 in the authors' code (reference/performance.md); an evaluation epoch
is ceil(N/128) such steps without augmentation or data loading.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_evaluate import random_inputs

from lors.config import Params
from lors.evaluate import train_networks_on_set
from lors.evaluation import parse_arch
from lors.models import build_dual_encoder
from lors.retrieval import test_retrieval


def params_for(args: argparse.Namespace) -> Params:
    return Params.model_validate({
        "device": args.device, "grid": {"datasets": ["bench"]},
        "datasets": {"bench": {"kind": "embedded", "image_size": args.size}},
        "model": {"image_encoder": args.image_encoder, "pretrained": False},
        "evaluate": {"num_eval": 1, "epochs": args.epochs, "eval_every": args.eval_every, "amp": args.amp},
        "tracking": {"enabled": False}})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[99, 499])
    parser.add_argument("--image-encoder", default="nfnet_l0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--extra-captions", type=int, default=0, help="images with a 6th caption (COCO: 10)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 test encoding")
    parser.add_argument("--tf32", action="store_true", help="also allow TF32 matmuls (convolutions use it by default)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tf32:  # cuDNN convolutions already default to TF32, as in the reference's measurement
        torch.backends.cuda.matmul.allow_tf32 = True
    params = params_for(args)
    arch = parse_arch(None, params)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; {args.image_encoder} {args.size} px, texts {args.text_dim}-d, "
          f"test {args.test_images} images, amp={args.amp}, tf32={args.tf32}")

    for pairs in args.pairs:
        synset, test = random_inputs(pairs, args.size, args.text_dim, args.test_images, 5, device)
        if args.extra_captions:
            extra = torch.arange(args.extra_captions, device=test.txt2img.device)
            test.txt2img = torch.cat([test.txt2img, extra])
            test.features = torch.cat([test.features, torch.randn(len(extra), args.text_dim, device=device)])
        model = build_dual_encoder(args.image_encoder, args.text_dim, False).to(device)
        for _ in range(2):  # warm-up, then one timed test pass
            synchronize(device)
            start = time.perf_counter()
            test_retrieval(model, test.images, test.features, test.txt2img, device, amp=args.amp)
            synchronize(device)
        pass_s = time.perf_counter() - start
        del model
        start = time.perf_counter()
        (net,) = train_networks_on_set(params, arch, synset, synset.texts, {"test": test}, progress=False)
        synchronize(device)
        wall = time.perf_counter() - start
        steps = (args.epochs + 1) * -(-pairs // params.evaluate.batch_size)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"{pairs:4d} pairs: one network {wall:7.1f} s = training {net['train_s']:.1f} s "
              f"({1000 * net['train_s'] / steps:.0f} ms/step, {steps} steps) + retrieval {net['eval_s']:.1f} s "
              f"({len(net['epochs'])} passes); one test pass {pass_s:.2f} s "
              f"({len(test.txt2img)} captions); peak {peak:.1f} GiB")


if __name__ == "__main__":
    main()
