"""End-to-end side-by-side: the authors' LoRS scripts against lors-bench's stages on real photos.

    .venv/bin/python benchmarks/side_by_side/run.py --authors-repo PATH/TO/LoRS_Distill \
        --data ../shared/data/ucm-captions --work /tmp/sbs --seeds 0 1 2

Both pipelines get the same data (a Flickr30k-Karpathy-layout folder), the same small models (timm
test_nfnet random init, all-MiniLM-L6-v2 [CLS] features, text head 384 -> 192) and the same
hyper-parameters (see README.md). Each pipeline/seed runs in its own folder under --work; a finished
one is not rerun. Prints mean recall (r_mean, mean ± std over the evaluation networks) per seed under
each tie rule, and writes everything to --work/side_by_side.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from lors.config import load_params  # noqa: E402
from lors.distill.lors import n_pairs  # noqa: E402
from lors.evaluation import parse_arch  # noqa: E402
from lors.experts import read_expert_meta  # noqa: E402
from lors.paths import Layout  # noqa: E402
from lors.stages.experts import expert_paths  # noqa: E402
from lors.retrieval import TIE_RULES  # noqa: E402

DATASET = "ucm"


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run a step once: a step whose log is marked done is skipped when the driver runs again."""
    done_marker = log.with_suffix(".done")
    if done_marker.is_file():
        return
    print("+", " ".join(map(str, cmd)), f"> {log}", flush=True)
    with open(log, "w") as fh:
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}; see {log}")
    done_marker.touch()


def subset_data(args) -> Path:
    """The data folder both pipelines read: --data itself, or (with --train-images N) a copy of its
    json files whose train split keeps N images spread evenly over it (val and test unchanged), next
    to a link to its images."""
    if args.train_images is None:
        return args.data.resolve()
    folder = (args.work / f"data-train{args.train_images}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rows = json.loads((args.data / "flickr30k_train.json").read_text())
    images = list(dict.fromkeys(row["image"] for row in rows))
    if not 0 < args.train_images <= len(images):
        sys.exit(f"--train-images: between 1 and {len(images)}")
    keep = set(images[i] for i in np.linspace(0, len(images) - 1, args.train_images).round().astype(int))
    (folder / "flickr30k_train.json").write_text(json.dumps([row for row in rows if row["image"] in keep]))
    for split in ("val", "test"):
        (folder / f"flickr30k_{split}.json").write_text((args.data / f"flickr30k_{split}.json").read_text())
    for entry in {row["image"].split("/")[0] for row in rows}:
        if not (folder / entry).exists():
            (folder / entry).symlink_to((args.data / entry).resolve())
    return folder


def _evals_per_net(args) -> int:
    """The authors evaluate a network at epochs 0, E//10, ..., E (evaluate_synset_with_similarity)."""
    return len(range(0, args.eval_epochs + 1, args.eval_epochs // 10))


def authors_pipeline(args, seed: int) -> dict:
    """buffer.py (experts) then distill_tesla_lors.py (LoRS, evaluated at iteration 0 and the last)."""
    from lors.data.text_features import resolve_encoder_source

    work = (args.work / "authors" / f"s{seed}").resolve()
    out = work / "result.json"
    if out.is_file():
        return json.loads(out.read_text())
    data = args.data_used
    (work / "distill_utils" / "data").mkdir(parents=True, exist_ok=True)
    link = work / "distill_utils" / "data" / "Flickr30k"  # buffer.py's __main__ hard-codes this image root
    if not link.exists():
        link.symlink_to(data)
    common = [sys.executable, HERE / "authors.py", "--authors-repo", args.authors_repo.resolve(), "--workdir", work,
              "--seed", seed, "--text-model", resolve_encoder_source("minilm"), "--text-dim", 384, "--image-dim", 192]
    models = ["--dataset", "flickr", "--image_size", args.image_size, "--image_encoder", "test_nfnet",
              "--text_encoder", "bert", "--ann_root", data, "--lr_teacher_img", 0.1, "--lr_teacher_txt", 0.1]
    _run([*common, "--script", "buffer.py", "--out", work / "buffer.json", "--", *models,
          "--num_experts", args.experts, "--train_epochs", args.expert_epochs, "--eval_freq", args.expert_epochs,
          "--batch_size_train", 128, "--buffer_path", work / "buffers", "--loss_type", "WBCE"], work / "buffer.log")
    _run([*common, "--script", "distill_tesla_lors.py", "--out", work / "distill.json", "--", *models,
          "--image_root", f"{data}/", "--buffer_path", work / "buffers" / "flickr" / "test_nfnet_bert" / "WBCE",
          "--num_queries", args.pairs, "--mini_batch_size", args.mini_batch, "--syn_steps", args.syn_steps,
          "--expert_epochs", 1, "--max_start_epoch", 2, "--Iteration", args.iterations, "--eval_it", args.iterations,
          "--num_eval", args.num_eval, "--epoch_eval_train", args.eval_epochs, "--lr_img", 100, "--lr_txt", 100,
          "--lr_sim", 1, "--lr_lr", 1e-4, "--sim_type", "lowrank", "--sim_rank", 4, "--alpha", 1,
          "--loss_type", "WBCE", "--dsa", "False", "--batch_train", 128, "--temperature", 0.07], work / "distill.log")
    buffer = json.loads((work / "buffer.json").read_text())
    distill = json.loads((work / "distill.json").read_text())
    evals = distill["itm_eval"]
    per_net = _evals_per_net(args)
    if len(evals) != 2 * args.num_eval * per_net:
        sys.exit(f"authors s{seed}: {len(evals)} evaluations, expected {2 * args.num_eval * per_net}")
    nets = [evals[k * per_net:(k + 1) * per_net] for k in range(2 * args.num_eval)]
    result = {"experts": buffer["itm_eval"], "random": nets[:args.num_eval], "lors": nets[args.num_eval:],
              "wandb": distill["wandb"]}
    out.write_text(json.dumps(result))
    return result


def lors_budget(args) -> int:
    """The LoRS budget that stores `--pairs` pairs: the authors' --num_queries 99 is budget 100 (S~ is
    charged one pair, method.md 8.5), which lors-bench's `reference` turns into 99 pairs."""
    budget = args.pairs + 1 if args.protocol == "reference" else args.pairs
    assert n_pairs(budget, args.protocol) == args.pairs
    return budget


def lors_params(args, seed: int, work: Path) -> dict:
    setting = {"lr_img": 100, "lr_txt": 100, "lr_sim": 1, "lr_lr": 1e-4, "rank": 4, "alpha": 1.0,
               "mini_batch": args.mini_batch, "syn_steps": args.syn_steps, "expert_epochs": 1, "max_start_epoch": 2,
               "iterations": args.iterations, "init_lr": 0.1, "loss": "wbce"}
    return {"profile": "side-by-side", "seed": seed, "protocol": args.protocol, "device": "cpu",
            "work_dir": str(work / "work"),
            "grid": {"experts": list(range(args.experts)), "datasets": [DATASET], "distill_methods": ["lors"],
                     "distill_budgets": [lors_budget(args)], "select_methods": ["random"],
                     "select_budgets": [args.pairs]},
            "datasets": {DATASET: {"kind": "flickr30k", "root": str(args.data_used),
                                   "ann_root": str(args.data_used), "image_size": args.image_size,
                                   "download_annotations": False}},
            "text_encoder": {"name": "minilm", "pooling": "cls", "max_words": 30, "batch_size": 128},
            "model": {"image_encoder": "test_nfnet", "pretrained": False, "temperature": 0.07, "text_head_dropout": 0.1},
            "experts": {"epochs": args.expert_epochs, "lr_img": 0.1, "lr_txt": 0.1, "batch_size": 128,
                        "augment": True, "eval_every": 0},
            "distill": {"checkpoint_every": 50,
                        "lors": {"default": setting, "settings": {DATASET: {lors_budget(args): {}}}}},
            "evaluate": {"num_eval": args.num_eval,
                         "default": {"epochs": args.eval_epochs, "batch_size": 128,
                                     "eval_every": args.eval_epochs // 10, "loss": "wbce"},
                         "methods": {"lors": {}, "random": {}}},
            "tracking": {"enabled": False}}


def lors_pipeline(args, seed: int) -> dict:
    """prepare -> embed-text -> experts -> distill (lors) / select (random) -> evaluate, via the CLI."""
    work = (args.work / f"lors-{args.protocol}" / f"s{seed}").resolve()
    out = work / "result.json"
    if out.is_file():
        return json.loads(out.read_text())
    work.mkdir(parents=True, exist_ok=True)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(lors_params(args, seed, work)))
    cli = [Path(sys.executable).parent / "lors-bench"]
    d, b, lb = ["-d", DATASET, "-p", params], ["-b", args.pairs], ["-b", lors_budget(args)]
    experts = [(f"expert{i}", ["experts", *d, "-e", i]) for i in range(args.experts)]
    for name, cmd in (("prepare", ["prepare", *d]), ("embed", ["embed-text", *d]), *experts,
                      ("distill", ["distill", *d, *lb, "-m", "lors"]), ("select", ["select", *d, *b, "-m", "random"]),
                      ("eval-lors", ["evaluate", *d, *lb, "-m", "lors"]),
                      ("eval-random", ["evaluate", *d, *b, "-m", "random"])):
        _run([*cli, *cmd], work / f"{name}.log", cwd=ROOT)
    result = lors_results(args, work)
    out.write_text(json.dumps(result))
    return result


def lors_results(args, work: Path) -> dict:
    """What a lors-bench run has finished so far, read through its own layout: each expert's metrics,
    each evaluated set's per-network test curves, and the tie rule of the recorded metrics."""
    params = load_params(work / "params.yaml")
    layout, arch = Layout(params.work_dir), parse_arch(None, params).name
    result = {"experts": [read_expert_meta(path)["metrics"] for path in expert_paths(params, DATASET) if path.is_file()],
              "ties": params.evaluate.tie_rule(params.protocol)}
    for method, budget in (("lors", lors_budget(args)), ("random", args.pairs)):
        path = layout.evaluation(DATASET, budget, method, arch)
        if path.is_file():
            result[method] = [net["test"] for net in json.loads(path.read_text())["networks"]]
    return result


def finished_part(args, pipeline: str, seed: int) -> dict | None:
    """For --table-only: a run's result, or its experts' alone when only they have finished."""
    folder = args.work / ("authors" if pipeline == "authors" else f"lors-{args.protocol}") / f"s{seed}"
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    if pipeline == "authors" and (folder / "buffer.json").is_file():
        part = {"experts": json.loads((folder / "buffer.json").read_text())["itm_eval"]}
        if (folder / "distill.json").is_file():  # stopped early (their loop breaks on a NaN loss)
            evals, per_net = json.loads((folder / "distill.json").read_text())["itm_eval"], _evals_per_net(args)
            nets = [evals[k * per_net:(k + 1) * per_net] for k in range(len(evals) // per_net)]
            part["random"] = nets[:args.num_eval]
            if len(nets) == 2 * args.num_eval:
                part["lors"] = nets[args.num_eval:]
        return part
    if pipeline != "lors" or not (folder / "params.yaml").is_file():
        return None
    part = lors_results(args, folder)
    return part if part["experts"] else None


def _rule(entry: dict, rule: str, primary: str | None) -> dict:
    """One evaluation's metrics under `rule`: the authors' records carry both rules by name; lors-bench's
    carry the primary rule unprefixed and the other one prefixed."""
    if rule in entry:
        return entry[rule]
    return entry if rule == primary else {k[len(rule) + 1:]: v for k, v in entry.items() if k.startswith(f"{rule}_")}


def best_r_mean(curves: list[list[dict]], rule: str, primary: str | None = None) -> list[float]:
    """Per network: the best r_mean over its evaluated epochs under `rule` (the reference's selection)."""
    return [max(_rule(e, rule, primary)["r_mean"] for e in curve) for curve in curves]


def rows(result: dict, authors: bool) -> dict[str, list[float]]:
    primary = None if authors else result["ties"]
    out = {}
    for rule in TIE_RULES:
        for name in ("lors", "random"):
            if name in result:
                out[f"{name}/{rule}"] = best_r_mean(result[name], rule, primary)
        out[f"experts/{rule}"] = [_rule(e, rule, primary)["r_mean"] for e in result["experts"]]
    if authors:  # the authors' own itm_eval numbers: must equal the argsort rule
        out["experts/authors-itm_eval"] = [e["authors"]["r_mean"] for e in result["experts"]]
        if "lors" in result:
            out["lors/authors-itm_eval"] = [max(e["authors"]["r_mean"] for e in c) for c in result["lors"]]
    return out


def table(results: dict[str, dict[int, dict[str, list[float]]]]) -> str:
    """One column per (pipeline, seed), one row per set / tie rule: mean ± std over networks."""
    keys = sorted({k for per_seed in results.values() for r in per_seed.values() for k in r})
    lines = ["| set / tie rule | " + " | ".join(f"{p} s{seed}" for p in results for seed in results[p]) + " |",
             "|---|" + "---|" * sum(len(v) for v in results.values())]
    for key in keys:
        cells = [f"{np.mean(r[key]):.1f} ± {np.std(r[key]):.1f}" if r.get(key) else "-"
                 for per_seed in results.values() for r in per_seed.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(results: dict[str, dict[int, dict[str, list[float]]]]) -> list[str]:
    """Per row measured by both: the authors' seed means, and whether lors-bench's mean over its seeds
    lies within their range (the issue's criterion, under one tie rule at a time)."""
    authors, lines = results.get("authors", {}), []
    for name, per_seed in results.items():
        if name == "authors":
            continue
        for key in sorted({k for r in per_seed.values() for k in r}):
            theirs = [float(np.mean(r[key])) for r in authors.values() if r.get(key)]
            ours = [float(np.mean(r[key])) for r in per_seed.values() if r.get(key)]
            if theirs and ours:
                mean, low, high = float(np.mean(ours)), min(theirs), max(theirs)
                verdict = "inside" if low <= mean <= high else "outside"
                lines.append(f"{key}: authors' seed means {', '.join(f'{v:.1f}' for v in theirs)}; {name} "
                             f"{', '.join(f'{v:.1f}' for v in ours)}, mean {mean:.1f}: {verdict} the authors' range")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authors-repo", type=Path, help="a checkout of github.com/silicx/LoRS_Distill")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ucm-captions")
    parser.add_argument("--work", type=Path, default=Path("side_by_side_work"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pipelines", nargs="+", default=["authors", "lors"], choices=["authors", "lors"])
    parser.add_argument("--protocol", default="reference", choices=["reference", "clean"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--expert-epochs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=99)
    parser.add_argument("--mini-batch", type=int, default=33)
    parser.add_argument("--syn-steps", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--num-eval", type=int, default=5)
    parser.add_argument("--eval-epochs", type=int, default=100)
    parser.add_argument("--train-images", type=int, help="use N of the train images (default: all)")
    parser.add_argument("--table-only", action="store_true", help="print the finished runs, start none")
    args = parser.parse_args()
    if "authors" in args.pipelines and not args.table_only and (args.authors_repo is None or not (args.authors_repo / "buffer.py").is_file()):
        sys.exit("--authors-repo: give a checkout of silicx/LoRS_Distill (a folder with buffer.py)")
    if not (args.data / "flickr30k_train.json").is_file():
        sys.exit(f"--data: {args.data} has no flickr30k_train.json (Flickr30k Karpathy layout expected)")
    if args.eval_epochs < 10 or args.eval_epochs % 10:
        sys.exit("--eval-epochs: a multiple of 10 (the authors evaluate every epochs//10)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.data_used = subset_data(args)
    results: dict[str, dict[int, dict]] = {}
    for pipeline in args.pipelines:
        name = "authors" if pipeline == "authors" else f"lors-bench ({args.protocol})"
        for seed in args.seeds:
            if args.table_only:
                raw = finished_part(args, pipeline, seed)
                if raw is None:
                    continue
            else:
                raw = authors_pipeline(args, seed) if pipeline == "authors" else lors_pipeline(args, seed)
            results.setdefault(name, {})[seed] = rows(raw, pipeline == "authors")
    (args.work / "side_by_side.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "rows": results}, indent=1))
    print("r_mean (percent), mean ± std over networks (experts: over experts); "
          "row = set / tie rule that produced it (best epoch chosen under the same rule)")
    print(table(results))
    print("\n".join(agreement(results)))


if __name__ == "__main__":
    main()
