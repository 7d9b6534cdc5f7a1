"""Run one of the authors' scripts (buffer.py or distill_tesla_lors.py) unmodified, as __main__, on CPU
with the shims of `shims.py`, and write what it logged (wandb calls, every itm_eval under both tie
rules) to a JSON file. Called by `run.py` in a fresh process per script and seed."""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the lors-bench checkout

from benchmarks.side_by_side import shims  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authors-repo", required=True, type=Path)
    parser.add_argument("--script", required=True, choices=["buffer.py", "distill_tesla_lors.py"])
    parser.add_argument("--workdir", required=True, type=Path, help="their relative paths resolve here")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--text-dim", type=int, required=True)
    parser.add_argument("--image-dim", type=int, required=True)
    parser.add_argument("--out", required=True, type=Path)
    args, script_args = parser.parse_known_args()
    script_args = script_args[1:] if script_args[:1] == ["--"] else script_args
    repo = args.authors_repo.resolve()
    args.out = args.out.resolve()
    os.chdir(args.workdir)
    shims.install(str(repo), args.text_model, args.text_dim, args.image_dim, str(args.out))
    # their scripts set no seed: seed every generator they draw from, once, before they start
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    sys.argv = [str(repo / args.script), *script_args]
    runpy.run_path(str(repo / args.script), run_name="__main__")
    args.out.write_text(json.dumps(shims.RECORD))


if __name__ == "__main__":
    main()
