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

from lors.distill.engine import Match, TrajectoryRun, TrajectorySettings, build_optimizer
from lors.distill.lors import LorsSettings
from lors.distill.mtt_vl import MttSettings, mtt_match
from lors.distill.synthetic import LearnableSet
from lors.distill.tesla_vl import TeslaSettings, tesla_match
from lors.distill.trajectories import ExpertPool
from lors.models import FunctionalDualEncoder, build_dual_encoder
from lors.similarity import IdentitySimilarity, build_similarity

SETTINGS = {"lors": LorsSettings(mini_batch=8, syn_steps=4, rank=4, lr_img=100, lr_txt=100),
            "tesla_vl": TeslaSettings(mini_batch=8, syn_steps=4, lr_img=100, lr_txt=100),
            "mtt_vl": MttSettings(mini_batch=8, syn_steps=4, lr_img=100, lr_txt=100)}


def build_run(method: str, settings: TrajectorySettings, pairs: int, image_size: int, text_dim: int,
              image_encoder: str = "test_nfnet", device: torch.device = torch.device("cpu")) -> tuple[TrajectoryRun, Match]:
    """The run and match function a method's module builds, on random-walk expert snapshots (the cost
    does not depend on what the snapshots contain)."""
    torch.manual_seed(0)
    student = FunctionalDualEncoder(build_dual_encoder(image_encoder, text_dim, pretrained=False).to(device).train())
    start_img, start_txt = student.initial()
    snaps = settings.max_start_epoch + settings.expert_epochs
    scale = torch.arange(snaps, device=device).view(-1, 1) * 1e-3
    trajectory = type("T", (), {"image": (start_img + scale * torch.randn_like(start_img)).cpu(),
                                "text": (start_txt + scale * torch.randn_like(start_txt)).cpu()})
    similarity = build_similarity("lowrank", pairs, settings.rank, settings.alpha) if method == "lors" \
        else IdentitySimilarity(pairs)
    syn = LearnableSet(torch.randn(pairs, 3, image_size, image_size), torch.randn(pairs, text_dim), similarity,
                       settings.init_lr).to(device)
    pool = ExpertPool([trajectory], snaps, (start_img.numel(), start_txt.numel()), device)
    generator = torch.Generator().manual_seed(0)
    run = TrajectoryRun(syn, pool, settings, build_optimizer(syn, settings, getattr(settings, "lr_sim", None)),
                        generator)
    if method == "mtt_vl":
        return run, mtt_match(settings, "reference", student, syn, generator)
    return run, tesla_match(settings, student, syn, generator)


def tiny_run(method: str, settings: TrajectorySettings | None = None, pairs: int = 19, image_size: int = 32,
             text_dim: int = 384) -> tuple[TrajectoryRun, Match]:
    return build_run(method, settings or SETTINGS[method], pairs, image_size, text_dim)


def one_iteration(run: TrajectoryRun, match: Match) -> None:
    """What distill_loop does per iteration: sample a segment, set the gradients, step."""
    match(run.segment())
    run.optimizer.step()


def compare_pass2(repeats: int, steps: int) -> None:
    """Median s/iteration of LoRS with pass 2 as the loop and batched over the steps, runs interleaved."""
    setting = SETTINGS["lors"].model_copy(update={"syn_steps": steps})
    runs = {name: tiny_run("lors", setting.model_copy(update={"batched_steps": batched}))
            for name, batched in (("loop", False), ("batched", True))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        one_iteration(*run)  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            tic = time.perf_counter()
            one_iteration(*run)
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
    run = tiny_run(method)
    one_iteration(*run)  # warm-up
    benchmark(one_iteration, *run)


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
        run = tiny_run(method)
        one_iteration(*run)
        times, peaks = [], []
        for _ in range(repeats):
            tic = time.perf_counter()
            peaks.append(peak_rss_above_baseline(lambda: one_iteration(*run)))
            times.append(time.perf_counter() - tic)
        print(f"{method:10s} {statistics.median(times):10.3f}   {max(peaks):10.1f}")


if __name__ == "__main__":
    main()
