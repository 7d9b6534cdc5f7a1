"""CPU micro-benchmark: time and peak memory of one distillation iteration on a tiny student.

    .venv/bin/python benchmarks/bench_distill.py            # table for lors, tesla_vl, mtt_vl
    .venv/bin/python benchmarks/bench_distill.py --compare-pass2 --threads 1   # LoRS pass 2: loop vs batched
    .venv/bin/pytest benchmarks/bench_distill.py --benchmark-enable

Tiny = timm `test_nfnet` at 32 px, 384-d texts (MiniLM width), 19 pairs, mini-batch 8, 4 steps,
random-walk expert snapshots (the cost does not depend on what the snapshots contain). Peak memory
is the process's resident-set peak above its level before the iteration, sampled every millisecond.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import psutil
import pytest
import torch

from lors.config import DistillSetting
from lors.distill.matching import tesla_iteration, walk_batches
from lors.distill.run import Distiller
from lors.distill.synthetic import LearnableSet, build_method_similarity
from lors.distill.trajectories import ExpertPool
from lors.models import FunctionalDualEncoder, build_dual_encoder

SETTING = DistillSetting(mini_batch=8, syn_steps=4, rank=4, lr_img=100, lr_txt=100, mtt_mini_batch=8)


def tiny_distiller(method: str, pairs: int = 19, image_size: int = 32, text_dim: int = 384,
                   setting: DistillSetting = SETTING) -> Distiller:
    torch.manual_seed(0)
    student = FunctionalDualEncoder(build_dual_encoder("test_nfnet", text_dim, pretrained=False).train())
    start_img, start_txt = student.initial()
    snaps = setting.max_start_epoch + setting.expert_epochs
    steps = torch.arange(snaps).view(-1, 1) * 1e-2
    trajectory = type("T", (), {"image": start_img + steps * torch.randn_like(start_img),
                                "text": start_txt + steps * torch.randn_like(start_txt)})
    syn = LearnableSet(torch.randn(pairs, 3, image_size, image_size), torch.randn(pairs, text_dim),
                       build_method_similarity(method, setting, pairs), setting.init_lr)
    pool = ExpertPool([trajectory], snaps, (start_img.numel(), start_txt.numel()), torch.device("cpu"))
    return Distiller(method, student, syn, pool, setting, "reference", torch.Generator().manual_seed(0))


def one_iteration(distiller: Distiller) -> None:
    distiller.match()
    distiller.update()


def lors_iteration(distiller: Distiller, step_chunk: int = 0) -> None:
    """Distiller.match + update for TESLA-style methods, passing the setting's batched_steps (and
    `step_chunk`) to the iteration (until the stage's Distiller.match passes it itself)."""
    s = distiller.setting
    _, _, segment = distiller.experts.sample(distiller.generator, s.max_start_epoch, s.expert_epochs)
    batches = walk_batches(len(distiller.syn), s.mini_batch, s.syn_steps, distiller.generator)
    tesla_iteration(distiller.student, distiller.syn, segment, [i.to(distiller.device) for i in batches], loss=s.loss,
                    temperature=s.temperature, merge_branches=s.merge_branches, batched_steps=s.batched_steps,
                    step_chunk=step_chunk)
    distiller.update()


def compare_pass2(repeats: int, steps: int) -> None:
    """Median s/iteration of LoRS with pass 2 as the loop and batched over the steps, runs interleaved."""
    setting = SETTING.model_copy(update={"syn_steps": steps})
    distillers = {name: tiny_distiller("lors", setting=setting.model_copy(update={"batched_steps": batched}))
                  for name, batched in (("loop", False), ("batched", True))}
    times: dict[str, list[float]] = {name: [] for name in distillers}
    for name, distiller in distillers.items():
        lors_iteration(distiller)  # warm-up
    for _ in range(repeats):
        for name, distiller in distillers.items():
            tic = time.perf_counter()
            lors_iteration(distiller)
            times[name].append(time.perf_counter() - tic)
    loop, batched = statistics.median(times["loop"]), statistics.median(times["batched"])
    print(f"lors, {steps} steps, mini-batch {setting.mini_batch}, {repeats} runs each: loop {loop:.3f} s/iter, "
          f"batched {batched:.3f} s/iter (median) -> batched/loop speed-up {loop / batched:.2f}x")


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare-pass2", action="store_true", help="LoRS pass 2: loop vs batched over the steps")
    parser.add_argument("--steps", type=int, default=8, help="unrolled steps for --compare-pass2")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.compare_pass2:
        compare_pass2(args.repeats, args.steps)
        return
    repeats = args.repeats
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
