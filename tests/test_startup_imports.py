"""Stage modules import only what every stage needs: a heavy library at module top is paid by each of
the demo's ~35 stage processes (benchmarks/bench_stage_startup.py measures the seconds)."""

from __future__ import annotations

import subprocess
import sys

STAGE_MODULES = ("lors.cli", "lors.stages.prepare", "lors.stages.embed_text", "lors.stages.experts",
                 "lors.stages.distill", "lors.stages.select", "lors.stages.evaluate", "lors.stages.report",
                 "lors.distill.registry", "baselines.registry")
LAZY = ("timm", "torchvision", "torch._dynamo", "transformers", "mlflow", "pandas", "matplotlib", "PIL")


def test_stage_modules_leave_heavy_libraries_unimported() -> None:
    code = (f"import sys\nfor m in {STAGE_MODULES!r}: __import__(m)\n"
            "from lors.distill.registry import methods; methods()\n"  # what validating params imports
            f"print(' '.join(m for m in {LAZY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"imported at module load: {loaded}"
