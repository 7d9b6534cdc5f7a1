"""Fixed cost of each stage: process start to the moment the stage starts its real work.

`dvc repro` starts one process per stage (18 on the demo grid), so every second of imports is paid
18 times. A stage's real work starts when its command hands validated params to the library; this
script runs each `lors-bench` command in a fresh interpreter with `lors.config.load_params` wrapped
to print the time and exit there, so everything imported up to that point (the CLI, the stage's
modules, pydantic) is counted, and nothing needs data. Measured against `python -c 'import torch'`
in the same run. The backend column is what the stage imports next, when it first builds a network
(timm, which pulls in torch._dynamo as every torch optimizer does) or loads the text encoder
(transformers); "fixed" is the sum, the stage's whole cost before its first real computation. The
numbers assume compiled bytecode (scripts/setup.sh installs with --compile-bytecode: where
PYTHONDONTWRITEBYTECODE is set, an install without it recompiles torch and timm in every process and
each stage pays 7-9 s instead). The last two rows time the other end of a stage process, from its
last output to the process's end, with torch and timm loaded: Python's usual interpreter teardown
against `lors.cli.leave`, with which the console script ends a stage that finished well. Run from the
repository root:
    .venv/bin/python benchmarks/bench_stage_startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "timm", "torchvision", "torch._dynamo", "transformers", "mlflow", "pandas", "matplotlib",
         "scipy", "PIL")

# (label, lors-bench arguments, the import the stage runs when it first builds something)
STAGES = [
    ("prepare", ["prepare", "--dataset", "embedded"], None),
    ("embed-text", ["embed-text", "--dataset", "embedded"], "from transformers import AutoModel"),
    ("experts", ["experts", "--dataset", "embedded", "--expert", "0"], "import timm"),
    ("distill", ["distill", "--dataset", "embedded", "--budget", "50", "--method", "lors"], "import timm"),
    ("select", ["select", "--dataset", "embedded", "--budget", "50", "--method", "herding"], "import timm"),
    ("evaluate", ["evaluate", "--dataset", "embedded", "--budget", "50", "--method", "lors"], "import timm"),
    ("report", ["report", "--dataset", "embedded"], None),
]

PROBE = """
import json, os, sys, time
import lors.config
load = lors.config.load_params
def probe(*args, **kwargs):
    load(*args, **kwargs)
    ready = time.time()
    heavy = [m for m in {heavy!r} if m in sys.modules]
    backend = {backend!r}
    if backend:
        exec(backend)
    print(json.dumps({{"ready": ready, "backend": time.time() - ready, "heavy": heavy}}), flush=True)
    os._exit(0)
lors.config.load_params = probe
from lors.cli import app
app({args!r}, prog_name="lors-bench")
"""


def _run(code: str) -> tuple[float, dict]:
    """Seconds from spawning `python -c code` to the time it prints, and what it printed."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return report["ready"] - start, report


def _baseline(statement: str) -> str:
    return f"import json, time\n{statement}\nprint(json.dumps({{'ready': time.time()}}))"


EXITS = [("exit: interpreter teardown", ""), ("exit: lors.cli.leave", "leave(0)")]


def _exit_seconds(ending: str) -> float:
    """Seconds from a process's last output (torch, timm and the CLI loaded, one tensor op done) to its end."""
    code = f"{_baseline('import timm, torch; from lors.cli import leave; torch.ones(8).sum()')}\n{ending}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return time.time() - json.loads(out.strip().splitlines()[-1])["ready"]


def measure(repeats: int, params: str) -> list[dict]:
    """Median over `repeats` fresh processes per row: the baselines first, then every stage."""
    rows = []
    for label, statement in (("python (nothing)", "pass"), ("python -c 'import torch'", "import torch")):
        times = [_run(_baseline(statement))[0] for _ in range(repeats)]
        rows.append({"stage": label, "to_work_s": statistics.median(times), "backend_s": 0.0, "heavy": []})
    for label, args, backend in STAGES:
        code = PROBE.format(heavy=HEAVY, backend=backend, args=[*args, "--params", params])
        runs = [_run(code) for _ in range(repeats)]
        rows.append({"stage": label, "to_work_s": statistics.median(t for t, _ in runs),
                     "backend_s": statistics.median(r["backend"] for _, r in runs), "heavy": runs[-1][1]["heavy"],
                     "backend": backend.split()[1] if backend else "-"})
    for row in rows:
        row["fixed_s"] = row["to_work_s"] + row["backend_s"]  # all a stage pays before its first network or encoder
    return rows


def measure_exits(repeats: int) -> list[tuple[str, float]]:
    """Median exit time over `repeats` processes for each ending in EXITS."""
    return [(label, statistics.median(_exit_seconds(ending) for _ in range(repeats))) for label, ending in EXITS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", default="params.yaml", help="a params file whose grid has dataset 'embedded'")
    args = parser.parse_args()
    rows = measure(args.repeats, args.params)
    torch_s = rows[1]["to_work_s"]
    print(f"{'stage':26s} {'to work (s)':>11s} {'- torch (s)':>11s} {'backend':>12s} {'+ (s)':>6s} {'fixed (s)':>9s}"
          f"  imported at work start")
    for row in rows:
        print(f"{row['stage']:26s} {row['to_work_s']:11.2f} {row['to_work_s'] - torch_s:11.2f} "
              f"{row.get('backend', '-'):>12s} {row['backend_s']:6.2f} {row['fixed_s']:9.2f}  {', '.join(row['heavy']) or '-'}")
    worst = max(rows[2:], key=lambda row: row["fixed_s"])
    print(f"largest fixed cost: {worst['stage']} {worst['fixed_s']:.2f} s (goal: at most 3 s)")
    for label, seconds in measure_exits(args.repeats):
        print(f"{label:26s} {seconds:11.2f} s from the last output to the process's end")


if __name__ == "__main__":
    main()
