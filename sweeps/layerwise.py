"""Layer-wise Laplace sweep: Optuna over prior precision and LoRA rank, Ray Tune trials, MLflow tracking.

python sweeps/layerwise.py [--config sweeps/configs/NAME.yaml] [key=value ...] [--output DIR]
                           [--address auto | HEAD:6379] [--resume] [--smoke-test]

With no arguments: sweeps/configs/default.yaml on a local Ray (tiny ViT, Fashion-MNIST classes 5-9).
Exit codes: 0 done (failed trials are recorded, not fatal), 1 every trial failed, 2 bad input, store
or cluster (nothing written), 3 a store failed mid-sweep, 130 interrupted (both: --resume --output DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis.report import build_report
from distlap.sweep.cli import main

CONFIGS = Path(__file__).resolve().parent / "configs"

if __name__ == "__main__":
    sys.exit(
        main(
            "layerwise",
            (CONFIGS / "default.yaml", CONFIGS / "smoke.yaml"),
            build_report,
            description=__doc__.splitlines()[0],
        )
    )
