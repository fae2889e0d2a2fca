"""One configuration fine-tuned to its MAP: data -> backbone -> PEFT -> training, and back from disk.

:func:`fine_tune` returns a :class:`FineTuned`, everything the later stages need (the model, its data
splits and input transform, the training history, the tuned-parameter count). :func:`save_fine_tuned`
writes the peft adapter and the history; :func:`restore_fine_tuned` rebuilds the same
:class:`FineTuned` from them without training (a retried or resumed sweep trial).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from distlap import names
from distlap.config import TrialConfig
from distlap.finetune.adapters import TunedParams, apply_peft, tuned_params
from distlap.finetune.backbones import load_backbone
from distlap.finetune.data import ImageTransform, Splits, load_splits, make_loader
from distlap.finetune.train import LogitsModel, TrainResult, fit_map
from distlap.runtime import resolve_device, seed_everything, set_threads

EVAL_BATCH = 256
ADAPTER_DIR = "adapter"
HISTORY_FILE = "history.json"


@dataclass
class FineTuned:
    """A fine-tuned trial: everything the Laplace stage and the trial's results need next."""

    cfg: TrialConfig
    model: LogitsModel  # pixel_values -> logits, wrapping the peft model
    transform: ImageTransform
    splits: Splits
    train: TrainResult
    tuned: TunedParams
    device: torch.device

    @property
    def peft_model(self) -> nn.Module:
        return self.model.model

    def loader(
        self,
        split: str,
        *,
        batch_size: int = EVAL_BATCH,
        shuffle: bool = False,
        max_examples: int | None = None,
    ) -> DataLoader:
        """Batches of ``split``; ``max_examples``: a seeded subset of that many (e.g. the Laplace fit)."""
        dataset = getattr(self.splits, split)
        if max_examples is not None and max_examples < len(dataset):
            g = torch.Generator().manual_seed(self.cfg.seed)
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:max_examples].tolist())
        return make_loader(dataset, batch_size, shuffle=shuffle, seed=self.cfg.seed, transform=self.transform)


def _prepared(cfg: TrialConfig, log) -> tuple[Splits, nn.Module, ImageTransform, torch.device]:
    """Seeds, threads, device, the data splits and the backbone with a fresh head: what both fine-tuning
    and restoring start from."""
    seed_everything(cfg.seed)
    threads = set_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg.data, seed=cfg.seed)
    log(
        f"[distlap] data {cfg.data.dataset} classes={cfg.data.classes or 'all'}: train {len(splits.train)}, "
        f"val {len(splits.val)}, test {len(splits.test)}; device {device}, {threads} threads"
    )
    backbone, transform = load_backbone(
        cfg.backbone.name,
        splits.num_classes,
        cache_dir=cfg.backbone.cache_dir,
        seed=cfg.seed,
        data_path=cfg.data.path,
    )
    return splits, backbone, transform, device


def fine_tune(cfg: TrialConfig, *, log=print) -> FineTuned:
    """Fine-tune ``cfg`` to its MAP; a failed training (non-finite loss) is in ``.train.status``."""
    splits, backbone, transform, device = _prepared(cfg, log)
    model = LogitsModel(apply_peft(backbone, cfg.peft))
    tuned = tuned_params(model.model)
    log(
        f"[distlap] {cfg.peft.method} on {cfg.backbone.name}: {tuned.trainable:,} of {tuned.total:,} "
        f"parameters tuned ({tuned.pct:.2f}%)"
    )
    ft = FineTuned(cfg, model, transform, splits, TrainResult(status="ok"), tuned, device)
    ft.train = fit_map(
        model,
        ft.loader("train", batch_size=cfg.train.batch_size, shuffle=True),
        ft.loader("val"),
        cfg.train,
        device,
        n_bins=cfg.n_bins,
        on_epoch=lambda row: log(_epoch_line(row, cfg.train.epochs)),
    )
    if ft.train.status != "ok":
        log(f"[distlap] fine-tuning FAILED: {ft.train.message}")
    return ft


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"[distlap] epoch {row['epoch']}/{epochs}: train loss {row[names.TRAIN_LOSS]:.4f}, "
        f"val acc {row[names.epoch_score('accuracy')]:.4f}, val ece {row[names.epoch_score('ece')]:.4f} "
        f"({row[names.EPOCH_TIME]:.1f}s)"
    )


def save_fine_tuned(ft: FineTuned, path: Path) -> None:
    """The peft adapter (with the trained head, a ``modules_to_save``) and the training history."""
    ft.peft_model.save_pretrained(path / ADAPTER_DIR)
    (path / HISTORY_FILE).write_text(json.dumps(ft.train.history))


def restore_fine_tuned(cfg: TrialConfig, path: Path, *, log=print) -> FineTuned:
    """What :func:`fine_tune` returned, rebuilt from :func:`save_fine_tuned`'s folder without training.

    Same data split, same backbone and fresh head; the adapter is loaded on top, trainable, so that the
    Laplace stage sees its parameters.
    """
    from peft import PeftModel

    splits, backbone, transform, device = _prepared(cfg, log)
    peft_model = PeftModel.from_pretrained(backbone, path / ADAPTER_DIR, is_trainable=True)
    history = json.loads((path / HISTORY_FILE).read_text())
    return FineTuned(
        cfg,
        LogitsModel(peft_model).to(device),
        transform,
        splits,
        TrainResult(status="ok", history=history),
        tuned_params(peft_model),
        device,
    )
