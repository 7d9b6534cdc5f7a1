"""Stage modules import only what every stage needs: a heavy library at module top is paid by each of
the demo's ~35 stage processes (benchmarks/bench_stage_startup.py measures the seconds)."""

from __future__ import annotations

import subprocess
import sys

STAGE_MODULES = ("lors.cli", "lors.data.prepare", "lors.data.text_features", "lors.experts", "lors.distill",
                 "baselines", "lors.evaluate", "lors.report")
LAZY = ("timm", "torchvision", "torch._dynamo", "transformers", "mlflow", "pandas", "matplotlib", "PIL")


def test_stage_modules_leave_heavy_libraries_unimported() -> None:
    code = (f"import sys\nfor m in {STAGE_MODULES!r}: __import__(m)\n"
            f"print(' '.join(m for m in {LAZY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"imported at module load: {loaded}"
