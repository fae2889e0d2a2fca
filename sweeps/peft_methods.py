"""PEFT methods sweep: NormTune vs LoRA vs Hybrid across backbones and data sets, a Ray Tune grid.

python sweeps/peft_methods.py [--config sweeps/configs/NAME.yaml] [key=value ...] [--output DIR]
                              [--address auto | HEAD:6379] [--resume] [--smoke-test]

With no arguments: sweeps/configs/peft_methods.yaml on a local Ray (2 tiny ViTs x 3 methods x 2 seeds
on Fashion-MNIST classes 5-9); the seed's three cluster settings are sweeps/configs/peft_methods_cluster.yaml.
Ends with the report in <output>/report/ (consolidated tables, composite plots, cross-setting trends).
Exit codes: 0 done (failed trials are recorded, not fatal), 1 every trial failed, 2 bad input, store
or cluster (nothing written), 3 a store failed mid-sweep, 130 interrupted (both: --resume --output DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis.peft_methods import build_peft_report
from distlap.sweep.cli import main

CONFIGS = Path(__file__).resolve().parent / "configs"

if __name__ == "__main__":
    sys.exit(
        main(
            "peft_methods",
            (CONFIGS / "peft_methods.yaml", CONFIGS / "peft_methods_smoke.yaml"),
            build_peft_report,
            description=__doc__.splitlines()[0],
        )
    )
