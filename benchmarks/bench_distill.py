"""CPU micro-benchmark: time and peak memory of one distillation iteration on a tiny student.

    .venv/bin/python benchmarks/bench_distill.py            # table for lors, tesla_vl, mtt_vl
    .venv/bin/pytest benchmarks/bench_distill.py --benchmark-enable

Tiny = timm `test_nfnet` at 32 px, 384-d texts (MiniLM width), 19 pairs, mini-batch 8, 4 steps,
random-walk expert snapshots (the cost does not depend on what the snapshots contain). Peak memory
is the process's resident-set peak above its level before the iteration, sampled every millisecond.
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil
import pytest
import torch

from lors.config import DistillSetting
from lors.distill.run import Distiller
from lors.distill.synthetic import LearnableSet, build_method_similarity
from lors.distill.trajectories import ExpertPool
from lors.models import FunctionalDualEncoder, build_dual_encoder

SETTING = DistillSetting(mini_batch=8, syn_steps=4, rank=4, lr_img=100, lr_txt=100, mtt_mini_batch=8)


def tiny_distiller(method: str, pairs: int = 19, image_size: int = 32, text_dim: int = 384) -> Distiller:
    torch.manual_seed(0)
    student = FunctionalDualEncoder(build_dual_encoder("test_nfnet", text_dim, pretrained=False).train())
    start_img, start_txt = student.initial()
    snaps = SETTING.max_start_epoch + SETTING.expert_epochs
    steps = torch.arange(snaps).view(-1, 1) * 1e-2
    trajectory = type("T", (), {"image": start_img + steps * torch.randn_like(start_img),
                                "text": start_txt + steps * torch.randn_like(start_txt)})
    syn = LearnableSet(torch.randn(pairs, 3, image_size, image_size), torch.randn(pairs, text_dim),
                       build_method_similarity(method, SETTING, pairs), SETTING.init_lr)
    pool = ExpertPool([trajectory], snaps, (start_img.numel(), start_txt.numel()), torch.device("cpu"))
    return Distiller(method, student, syn, pool, SETTING, "reference", torch.Generator().manual_seed(0))


def one_iteration(distiller: Distiller) -> None:
    distiller.match()
    distiller.update()


def peak_rss_above_baseline(fn) -> float:
    """MiB of resident memory above the level before `fn`, sampled by a background thread."""
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (peak - baseline) / 2**20


@pytest.mark.parametrize("method", ["lors", "tesla_vl", "mtt_vl"])
def test_one_iteration(benchmark, method):
    distiller = tiny_distiller(method)
    one_iteration(distiller)  # warm-up
    benchmark(one_iteration, distiller)


def main(repeats: int = 5) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("method     median s/iter   peak RSS above baseline (MiB)")
    for method in ("lors", "tesla_vl", "mtt_vl"):
        distiller = tiny_distiller(method)
        one_iteration(distiller)
        times, peaks = [], []
        for _ in range(repeats):
            tic = time.perf_counter()
            peaks.append(peak_rss_above_baseline(lambda: one_iteration(distiller)))
            times.append(time.perf_counter() - tic)
        print(f"{method:10s} {statistics.median(times):10.3f}   {max(peaks):10.1f}")


if __name__ == "__main__":
    main()
