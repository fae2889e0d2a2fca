"""One trial, end to end, without Ray: data -> backbone -> PEFT -> MAP fine-tuning -> metrics.

``python -m distlap.trial [--config X.yaml] [key=value ...] [--output DIR]`` prints the result as
JSON (accuracy, ECE, NLL, Brier, tuned params %, time per epoch, provenance). The sweeps call
:func:`fine_tune` / :func:`run_trial` in their Ray workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distlap import metrics
from distlap.adapters import TunedParams, apply_peft, tuned_params
from distlap.backbones import BackboneError, LogitsModel, load_backbone
from distlap.config import ConfigError, TrialConfig, load_config, to_yaml
from distlap.data import DataError, ImageTransform, Splits, load_splits, make_loader
from distlap.provenance import provenance
from distlap.runtime import resolve_device, seed_everything, set_threads
from distlap.train import TrainResult, fit_map, predict

EVAL_BATCH = 256
RESULT_FILE = "trial_result.json"


@dataclass
class FineTuned:
    """A fine-tuned trial: everything the Laplace stage needs next."""

    cfg: TrialConfig
    model: LogitsModel          # pixel_values -> logits, wrapping the peft model
    transform: ImageTransform
    splits: Splits
    train: TrainResult
    tuned: TunedParams
    device: torch.device

    @property
    def peft_model(self) -> nn.Module:
        return self.model.model

    def loader(self, split: str, *, batch_size: int = EVAL_BATCH, shuffle: bool = False):
        return make_loader(getattr(self.splits, split), batch_size, shuffle=shuffle,
                           seed=self.cfg.seed, transform=self.transform)


def fine_tune(cfg: TrialConfig, *, log=print) -> FineTuned:
    seed_everything(cfg.seed)
    threads = set_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg.data, seed=cfg.seed)
    log(f"[distlap] data {cfg.data.dataset} classes={cfg.data.classes or 'all'}: train {len(splits.train)}, "
        f"val {len(splits.val)}, test {len(splits.test)}; device {device}, {threads} threads")
    backbone, transform = load_backbone(cfg.backbone.name, splits.num_classes,
                                        cache_dir=cfg.backbone.cache_dir, seed=cfg.seed,
                                        data_path=cfg.data.path)
    model = LogitsModel(apply_peft(backbone, cfg.peft))
    tuned = tuned_params(model.model)
    log(f"[distlap] {cfg.peft.method} on {cfg.backbone.name}: {tuned.trainable:,} of {tuned.total:,} "
        f"parameters tuned ({tuned.pct:.2f}%)")
    ft = FineTuned(cfg, model, transform, splits, TrainResult(status="ok"), tuned, device)
    ft.train = fit_map(model, ft.loader("train", batch_size=cfg.train.batch_size, shuffle=True),
                       ft.loader("val"), cfg.train, device, n_bins=cfg.n_bins,
                       on_epoch=lambda row: log(_epoch_line(row, cfg.train.epochs)))
    if ft.train.status != "ok":
        log(f"[distlap] fine-tuning FAILED: {ft.train.message}")
    return ft


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"[distlap] epoch {row['epoch']}/{epochs}: train loss {row['train/loss']:.4f}, "
            f"val acc {row['val/accuracy']:.4f}, val ece {row['val/ece']:.4f} ({row['time_per_epoch_s']:.1f}s)")


def evaluate_map(ft: FineTuned) -> dict[str, float]:
    """MAP metrics on validation and test, namespaced ``val/ece``, ``test/accuracy``, ..."""
    out = {}
    for split in ("val", "test"):
        probs, labels = predict(ft.model, ft.loader(split), ft.device)
        out.update({f"{split}/{k}": v for k, v in metrics.summarize(probs, labels, ft.cfg.n_bins).items()})
    return out


def run_trial(cfg: TrialConfig, *, log=print) -> dict:
    """Fine-tune and evaluate one config; write ``trial_result.json`` (and the adapter) if asked to."""
    start = time.perf_counter()
    ft = fine_tune(cfg, log=log)
    result = {
        "status": ft.train.status,
        "message": ft.train.message,
        "metrics": {"tuned_params": ft.tuned.trainable, "tuned_params_pct": ft.tuned.pct,
                    "time_per_epoch_s": ft.train.time_per_epoch_s},
        "history": ft.train.history,
    }
    if ft.train.status == "ok":
        result["metrics"].update(evaluate_map(ft))
    result["metrics"]["wall_time_s"] = time.perf_counter() - start
    result.update(config=cfg.model_dump(mode="json"), provenance=provenance())
    if cfg.output_dir:
        write_trial(ft, result, Path(cfg.output_dir))
    return result


def write_trial(ft: FineTuned, result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(ft.cfg))
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    if ft.train.status == "ok":
        ft.peft_model.save_pretrained(out / "adapter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distlap.trial", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML config (default: the embedded default)")
    parser.add_argument("--output", type=Path, help="output folder (sets output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. peft.method=norm train.epochs=1")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output.resolve()}"] if args.output else [])
    try:
        cfg = load_config(args.config, overrides)
        result = run_trial(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ConfigError, DataError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"status": result["status"], "message": result["message"], **result["metrics"]}, indent=2))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
