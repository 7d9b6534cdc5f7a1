"""GPU timing of one distillation iteration at the paper's Flickr settings (method.md 3.1).

    python benchmarks/gpu_distill.py                       # Flickr-100 and Flickr-500 shapes, LoRS
    python benchmarks/gpu_distill.py --method tesla_vl --iters 20

NFNet-L0 (random init of the real shape: no weights are downloaded), 224 px, 768-d texts, text
head 768 -> 2304, 8 unrolled steps, random-walk expert snapshots (cost does not depend on their
values). Reports the median seconds per iteration after warm-up and torch.cuda.max_memory_allocated.
Reference on one H100 (performance.md): 2.73 s / 11.35 GiB (99 pairs, mini-batch 20) and
2.91 s / 19.9 GiB (499 pairs, mini-batch 40); goal <= 0.9 s / 6 GiB and 1.0 s / 10 GiB.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from lors.config import DistillSetting
from lors.distill.run import Distiller
from lors.distill.synthetic import LearnableSet, build_method_similarity
from lors.distill.trajectories import ExpertPool
from lors.models import FunctionalDualEncoder, build_dual_encoder

SHAPES = {"flickr100": dict(pairs=99, mini_batch=20, rank=10, alpha=3.0, max_start_epoch=2),
          "flickr500": dict(pairs=499, mini_batch=40, rank=20, alpha=0.01, max_start_epoch=3)}


def build(method: str, shape: dict, device: torch.device, image_size: int, text_dim: int) -> Distiller:
    torch.manual_seed(0)
    setting = DistillSetting(mini_batch=shape["mini_batch"], rank=shape["rank"], alpha=shape["alpha"],
                             max_start_epoch=shape["max_start_epoch"], syn_steps=8, lr_img=100, lr_txt=100)
    model = build_dual_encoder("nfnet_l0", text_dim, pretrained=False).to(device).train()
    student = FunctionalDualEncoder(model)
    start_img, start_txt = student.initial()
    snaps = setting.max_start_epoch + setting.expert_epochs
    scale = torch.arange(snaps, device=device).view(-1, 1) * 1e-3
    trajectory = SimpleNamespace(image=(start_img + scale * torch.randn_like(start_img)).cpu(),
                                 text=(start_txt + scale * torch.randn_like(start_txt)).cpu())
    pairs = shape["pairs"]
    syn = LearnableSet(torch.randn(pairs, 3, image_size, image_size), torch.randn(pairs, text_dim),
                       build_method_similarity(method, setting, pairs), setting.init_lr).to(device)
    pool = ExpertPool([trajectory], snaps, (start_img.numel(), start_txt.numel()), device)
    return Distiller(method, student, syn, pool, setting, "reference", torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="lors", choices=["lors", "tesla_vl", "mtt_vl"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, tf32={args.tf32}")
    for name in args.shapes:
        distiller = build(args.method, SHAPES[name], device, args.image_size, 768)
        for _ in range(args.warmup):
            distiller.match()
            distiller.update()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters):
            tic = time.perf_counter()
            distiller.match()
            distiller.update()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - tic)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"{args.method} {name}: median {statistics.median(times):.3f} s/iter, peak {peak:.2f} GiB allocated")
        del distiller
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
