"""GPU throughput of the expert train step: NFNet-L0 at 224 px, batch 128, data on the GPU.

Real augmentation (train_augment on the device) is included; the reference (`buffer.py`, fp32 +
TF32, 4 CPU loader workers) reaches 1,137 img/s median on an H100, and the bare network step
2,609 img/s with bf16 + channels_last (reference/performance.md). Target: >= 2,600 img/s.
    python benchmarks/gpu_experts.py [--steps 30] [--modes fp32 tf32 bf16_cl] [--no-augment]
Random-initialised weights (timing does not depend on them; no download needed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lors.experts import make_expert_optimizer, train_contrastive_epoch
from lors.models import build_dual_encoder

MODES = {  # name: (allow TF32, bf16 autocast, channels_last)
    "fp32": (False, False, False),
    "tf32": (True, False, False),
    "bf16_cl": (True, True, True),
}


def measure(mode: str, steps: int, warmup: int, batch: int, size: int, text_dim: int, augment: bool) -> dict:
    tf32, amp, channels_last = MODES[mode]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    n = batch * max(steps, warmup)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    texts = torch.randn(n, text_dim, device=device)
    txt2img = np.arange(n)
    torch.manual_seed(0)
    model = build_dual_encoder("nfnet_l0", text_dim, pretrained=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_expert_optimizer(model, 0.1, 0.1)
    generator = torch.Generator().manual_seed(0)

    def epoch(rows: int) -> None:
        train_contrastive_epoch(model, optimizer, images[:rows], texts[:rows], txt2img[:rows], batch_size=batch,
                                generator=generator, device=device, augment=augment, amp=amp,
                                channels_last=channels_last)

    epoch(batch * warmup)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    epoch(batch * steps)  # returns after .item() of the mean loss: the queue has drained
    elapsed = time.perf_counter() - start
    return {"mode": mode, "img_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  augment={not args.no_augment}")
    for mode in args.modes:
        r = measure(mode, args.steps, args.warmup, args.batch, args.size, args.text_dim, not args.no_augment)
        print(f"{r['mode']:>8}: {r['img_per_s']:7,.0f} img/s  {r['ms_per_step']:6.1f} ms/step  "
              f"peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
