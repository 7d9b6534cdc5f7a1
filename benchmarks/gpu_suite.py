"""One prepared run of the four speed measurements against the reference's costs (reference/performance.md).

    python benchmarks/gpu_suite.py            # one H100/H200: paper shapes, about 3-5 minutes
    python benchmarks/gpu_suite.py --tiny     # CPU check of the same code paths: tiny shapes, < 1 minute

Measurements (random-initialised networks of the real shapes and random data: no download, and the
cost does not depend on the values):
1. experts: NFNet-L0 + text head, 224 px, batch 128, real augmentation on the device, data on the
   device (`lors.experts.train_contrastive_epoch`), in fp32, TF32 and bf16 autocast + channels_last;
   experts_img_per_s is the fastest. Reference: 1,137 img/s median (768 mean); goal >= 2,600.
2. LoRS iteration at the Flickr-100 shape (99 pairs, mini-batch 20, 8 steps) and the Flickr-500 shape
   (499 pairs, mini-batch 40), with pass 2 as the loop, batched over all steps (`batched_steps`) and
   batched over half the steps at a time (less memory); median s/iteration and
   torch.cuda.max_memory_allocated of each; the keys report the fastest. Reference: 2.73 s / 11.35 GiB and
   2.91 s / 19.9 GiB; goals <= 0.9 s / 6 GiB and <= 1.0 s / 10 GiB.
3. one evaluation network (99 pairs, epochs 0..100, test retrieval every 10 on 1,000 images x 5
   captions), trained alone (`lors.evaluation.protocol.train_networks_on_set`) and as one of num_eval stacked
   networks (`lors.evaluation.stacked`); goal: the stacked per-network time <= half the sequential one.

Writes `benchmarks/results/gpu-<date>.json` (`cpu-tiny-<date>.json` with --tiny) with the keys device,
experts_img_per_s, lors_flickr100_s_per_it, lors_flickr100_peak_gib, lors_flickr500_s_per_it,
lors_flickr500_peak_gib, eval_network_s (plus the per-option details), and a Markdown table next to it.
Peak memory is null on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import build_run, one_iteration  # noqa: E402
from bench_evaluate import random_inputs  # noqa: E402

from lors.config import Params  # noqa: E402
from lors.distill.lors import LorsSettings  # noqa: E402
from lors.evaluation.protocol import train_networks_on_set  # noqa: E402
from lors.evaluation import parse_arch  # noqa: E402
from lors.evaluation.stacked import seeded_members, train_stacked  # noqa: E402
from lors.experts import make_expert_optimizer, train_contrastive_epoch  # noqa: E402
from lors.models import build_dual_encoder  # noqa: E402
from lors.runtime import member_seed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXPERT_MODES = {"fp32": (False, False, False), "tf32": (True, False, False), "bf16_cl": (True, True, True)}
REFERENCE = {"experts_img_per_s": 1137.0, "lors_flickr100_s_per_it": 2.73, "lors_flickr100_peak_gib": 11.35,
             "lors_flickr500_s_per_it": 2.91, "lors_flickr500_peak_gib": 19.9}
GOALS = {"experts_img_per_s": ">= 2600", "lors_flickr100_s_per_it": "<= 0.9", "lors_flickr100_peak_gib": "<= 6",
         "lors_flickr500_s_per_it": "<= 1.0", "lors_flickr500_peak_gib": "<= 10",
         "eval_network_s": "stacked <= 0.5 x sequential"}


@dataclass(frozen=True)
class Sizes:
    """Every shape the suite uses: the paper's on a GPU, tiny ones for the CPU check."""

    image_encoder: str
    image_size: int
    text_dim: int
    expert_batch: int
    expert_steps: int
    expert_modes: tuple[str, ...]
    lors: dict  # shape name -> pairs, mini_batch, syn_steps, rank, alpha, max_start_epoch
    lors_iters: int
    eval_pairs: int
    eval_epochs: int
    eval_every: int
    eval_test_images: int
    num_eval: int


PAPER = Sizes("nfnet_l0", 224, 768, 128, 30, tuple(EXPERT_MODES),
              {"flickr100": dict(pairs=99, mini_batch=20, syn_steps=8, rank=10, alpha=3.0, max_start_epoch=2),
               "flickr500": dict(pairs=499, mini_batch=40, syn_steps=8, rank=20, alpha=0.01, max_start_epoch=3)},
              lors_iters=8, eval_pairs=99, eval_epochs=100, eval_every=10, eval_test_images=1000, num_eval=5)
TINY = Sizes("test_nfnet", 32, 64, 16, 3, ("fp32",),
             {"flickr100": dict(pairs=19, mini_batch=8, syn_steps=4, rank=4, alpha=3.0, max_start_epoch=2),
              "flickr500": dict(pairs=29, mini_batch=6, syn_steps=8, rank=4, alpha=0.01, max_start_epoch=3)},
             lors_iters=2, eval_pairs=20, eval_epochs=4, eval_every=2, eval_test_images=50, num_eval=3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def torch_default_tf32() -> None:
    """torch's defaults, which the reference ran under: TF32 convolutions, fp32 matmuls."""
    set_tf32(matmul=False, cudnn=True)


# --- 1. expert training -------------------------------------------------------------------------------

def measure_experts(mode: str, sizes: Sizes, device: torch.device, warmup: int = 2) -> dict:
    """Throughput of `train_contrastive_epoch` (augmentation included) with the data already on `device`."""
    tf32, amp, channels_last = EXPERT_MODES[mode]
    set_tf32(tf32, tf32)
    torch.backends.cudnn.benchmark = True
    batch, steps = sizes.expert_batch, sizes.expert_steps
    n = batch * max(steps, warmup)
    images = torch.randint(0, 256, (n, 3, sizes.image_size, sizes.image_size), dtype=torch.uint8, device=device)
    texts = torch.randn(n, sizes.text_dim, device=device)
    torch.manual_seed(0)
    model = build_dual_encoder(sizes.image_encoder, sizes.text_dim, pretrained=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_expert_optimizer(model, 0.1, 0.1)
    generator = torch.Generator().manual_seed(0)

    def epoch(rows: int) -> None:  # returns after .item() of the mean loss: the queue has drained
        train_contrastive_epoch(model, optimizer, images[:rows], texts[:rows], np.arange(rows), batch_size=batch,
                                generator=generator, device=device, augment=True, amp=amp,
                                channels_last=channels_last)

    epoch(batch * warmup)
    reset_peak(device)
    start = time.perf_counter()
    epoch(batch * steps)
    elapsed = time.perf_counter() - start
    torch_default_tf32()
    return {"img_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "peak_gib": peak_gib(device)}


# --- 2. LoRS distillation iteration --------------------------------------------------------------------

def lors_shape(shape: dict, sizes: Sizes, device: torch.device, batched: bool, chunk: int):
    """A LoRS run of the shape (bench_distill.build_run), pass 2 as the loop or batched over the steps."""
    settings = LorsSettings(mini_batch=shape["mini_batch"], rank=shape["rank"], alpha=shape["alpha"],
                            max_start_epoch=shape["max_start_epoch"], syn_steps=shape["syn_steps"], lr_img=100,
                            lr_txt=100, batched_steps=batched, step_chunk=chunk)
    return build_run("lors", settings, shape["pairs"], sizes.image_size, sizes.text_dim, sizes.image_encoder, device)


def timed(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


PASS2_OPTIONS = {"loop": (False, 0), "batched": (True, 0), "batched_half": (True, -2)}  # chunk -2: K/2 steps per vmap


def measure_lors(shape: dict, sizes: Sizes, device: torch.device, option: str) -> dict:
    batched, chunk = PASS2_OPTIONS[option]
    chunk = shape["syn_steps"] // -chunk if chunk < 0 else chunk
    run = lors_shape(shape, sizes, device, batched, chunk)
    one_iteration(*run)  # warm-up outside the peak window (cuDNN autotuning, first allocations)
    reset_peak(device)
    times = timed(lambda: one_iteration(*run), device, sizes.lors_iters, warmup=1)
    result = {"s_per_it": statistics.median(times), "peak_gib": peak_gib(device)}
    run = None  # free the set and the expert snapshots before the next shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --- 3. one evaluation network --------------------------------------------------------------------------

def eval_params(sizes: Sizes, device: torch.device) -> Params:
    return Params.model_validate({
        "device": str(device), "protocol": "clean", "grid": {"datasets": ["bench"]},  # clean: a backbone per network
        "datasets": {"bench": {"kind": "embedded", "image_size": sizes.image_size}},
        "model": {"image_encoder": sizes.image_encoder, "pretrained": False},
        "evaluate": {"num_eval": sizes.num_eval, "default": {"epochs": sizes.eval_epochs,
                                                             "eval_every": sizes.eval_every}},
        "tracking": {"enabled": False}})


def measure_eval(sizes: Sizes, device: torch.device) -> dict:
    """Wall time of one network trained alone, and per network when num_eval are trained stacked."""
    params = eval_params(sizes, device)
    arch = parse_arch(None, params)
    synset, test = random_inputs(sizes.eval_pairs, sizes.image_size, sizes.text_dim, sizes.eval_test_images, 5, device)
    splits = {"test": test}
    synchronize(device)
    start = time.perf_counter()
    settings = params.evaluate.default
    (alone,) = train_networks_on_set(params, arch, synset, synset.texts, splits, settings, num_eval=1, progress=False)
    synchronize(device)
    sequential_s = time.perf_counter() - start

    images, texts = synset.images.float().to(device), synset.texts.float().to(device)
    similarity = synset.similarity.float().to(device)

    def build():
        return build_dual_encoder(arch.image_encoder, sizes.text_dim, False, params.model.temperature,
                                  params.model.text_head_dropout).to(device)

    synchronize(device)
    start = time.perf_counter()
    members = seeded_members(build, [member_seed(params.seed, k) for k in range(sizes.num_eval)])
    curves = train_stacked(members, images, texts, similarity, lr_img=synset.lr_img, lr_txt=synset.lr_txt,
                           settings=settings, amp=params.evaluate.amp, splits=splits, device=device, progress=False)
    synchronize(device)
    stacked_s = (time.perf_counter() - start) / sizes.num_eval
    # on CPU the first stacked network is the one trained alone; CUDA draws dropout masks another way
    same_first = np.allclose(alone["loss"], curves[0]["loss"], rtol=1e-4, atol=1e-6) if device.type == "cpu" else None
    return {"sequential_s": sequential_s, "sequential_train_s": alone["train_s"], "sequential_eval_s": alone["eval_s"],
            "stacked_s_per_network": stacked_s, "stacked_train_s_per_network": curves[0]["train_s"],
            "stacked_eval_s_per_network": statistics.mean(c["eval_s"] for c in curves),
            "num_eval": sizes.num_eval, "first_network_losses_match": same_first,
            "test_passes": len(alone["epochs"])}


# --- the run ---------------------------------------------------------------------------------------------

def guarded(measure: Callable[[], dict], device: torch.device) -> dict:
    """One measurement; a CUDA out-of-memory is recorded as its result instead of ending the run."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}


def run_suite(sizes: Sizes, device: torch.device, save: Callable[[dict], None]) -> dict:
    """All measurements; `save(result)` after each, so a run cut short still leaves what it measured."""
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result: dict = {"device": name, "torch": torch.__version__, "tiny": sizes is TINY,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    modes = sizes.expert_modes if device.type == "cuda" else ("fp32",)  # amp is CUDA-only in the expert loop
    experts = {mode: guarded(lambda mode=mode: measure_experts(mode, sizes, device), device) for mode in modes}
    done = [m for m in experts if "error" not in experts[m]]
    best = max(done, key=lambda m: experts[m]["img_per_s"]) if done else None
    result.update(experts_img_per_s=experts[best]["img_per_s"] if best else None, experts_mode=best,
                  experts_modes=experts)
    save(result)
    for shape_name, shape in sizes.lors.items():
        options = {option: guarded(lambda option=option: measure_lors(shape, sizes, device, option), device)
                   for option in PASS2_OPTIONS}
        done = [o for o in options if "error" not in options[o]]
        fastest = min(done, key=lambda o: options[o]["s_per_it"]) if done else None
        result[f"lors_{shape_name}_s_per_it"] = options[fastest]["s_per_it"] if fastest else None
        result[f"lors_{shape_name}_peak_gib"] = options[fastest]["peak_gib"] if fastest else None
        result[f"lors_{shape_name}_pass2"] = fastest
        result[f"lors_{shape_name}_options"] = options
        result[f"lors_{shape_name}_batched_speedup"] = (options["loop"]["s_per_it"] / options["batched"]["s_per_it"]
                                                        if {"loop", "batched"} <= set(done) else None)
        save(result)
    evaluation = guarded(lambda: measure_eval(sizes, device), device)
    if "error" not in evaluation:
        result.update(eval_network_s=evaluation["sequential_s"],
                      eval_network_stacked_s=evaluation["stacked_s_per_network"],
                      eval_stacked_speedup=evaluation["sequential_s"] / evaluation["stacked_s_per_network"])
    else:
        result.update(eval_network_s=None, eval_network_stacked_s=None, eval_stacked_speedup=None)
    result["eval_details"] = evaluation
    result["suite_s"] = time.perf_counter() - started
    save(result)
    return result


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.3f}" if value < 100 else f"{value:,.0f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def errors(result: dict, path: str = "") -> list[str]:
    """Where a measurement failed (out of memory), as dotted paths into the result."""
    found = [path] if "error" in result else []
    for key, value in result.items():
        if isinstance(value, dict):
            found += errors(value, f"{path}.{key}" if path else key)
    return found


def markdown(result: dict) -> str:
    rows = [("expert training, img/s", "experts_img_per_s"),
            ("LoRS Flickr-100 iteration, s", "lors_flickr100_s_per_it"),
            ("LoRS Flickr-100 peak, GiB", "lors_flickr100_peak_gib"),
            ("LoRS Flickr-500 iteration, s", "lors_flickr500_s_per_it"),
            ("LoRS Flickr-500 peak, GiB", "lors_flickr500_peak_gib"),
            ("one evaluation network (sequential), s", "eval_network_s"),
            ("one evaluation network (stacked, per network), s", "eval_network_stacked_s")]
    note = ("CPU --tiny check: tiny shapes, NOT comparable with the reference's H100 figures."
            if result["tiny"] else "Reference: the authors' code on one H100 (reference/performance.md).")
    lines = [f"# Speed suite, {result['device']}, torch {result['torch']}, {result['date']}", "", note, "",
             "| measurement | ours | reference (H100) | goal |", "| --- | --- | --- | --- |"]
    for label, key in rows:
        lines.append(f"| {label} | {fmt(result.get(key))} | {fmt(REFERENCE.get(key))} | {GOALS.get(key, '')} |")
    details = result.get("eval_details", {})
    lines += ["", f"Experts: fastest mode {result['experts_mode']}. Pass 2 chosen: Flickr-100 "
              f"{result['lors_flickr100_pass2']}, Flickr-500 {result['lors_flickr500_pass2']} (batched over loop: "
              f"{ratio(result['lors_flickr100_batched_speedup'])}, {ratio(result['lors_flickr500_batched_speedup'])}). "
              f"Evaluation: {details.get('num_eval', 'n/a')} networks stacked, "
              f"{ratio(result['eval_stacked_speedup'])} per network. Errors: "
              f"{', '.join(errors(result)) or 'none'}. "
              f"Suite wall time {result['suite_s']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the suite without a GPU")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: 1 with --tiny, which a shared CPU runs far faster, else torch's)")
    args = parser.parse_args()
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    if args.tiny:
        device, sizes = torch.device("cpu"), TINY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), PAPER
    else:
        raise SystemExit("gpu_suite: no CUDA device; run with --tiny for the CPU check")
    stem = args.out / f"{'cpu-tiny' if args.tiny else 'gpu'}-{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    result = run_suite(sizes, device, save)
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
