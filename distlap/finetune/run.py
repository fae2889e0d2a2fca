"""One configuration fine-tuned to its MAP: data -> backbone -> PEFT -> training, and back from disk.

:func:`fine_tune` returns a :class:`FineTuned`, everything the later stages need (the model, its data
splits and input transform, the training history, the tuned-parameter count). :func:`save_fine_tuned`
writes the peft adapter and the training record; :func:`restore_fine_tuned` rebuilds the same
:class:`FineTuned` from them without training (a retried or resumed sweep trial).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from distlap import names
from distlap.config import TrainConfig, TrialConfig
from distlap.finetune.adapters import TunedParams, apply_peft, tuned_params
from distlap.finetune.anchor import load_prior_mean, prior_mean, save_prior_mean
from distlap.finetune.backbones import load_backbone
from distlap.finetune.data import ImageTransform, Splits, load_splits, make_loader
from distlap.finetune.train import GaussianPrior, LogitsModel, TrainResult, fit_map
from distlap.runtime import resolve_device, seed_everything, set_threads

EVAL_BATCH = 256
ADAPTER_DIR = "adapter"
HISTORY_FILE = "train_result.json"


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
    prior: GaussianPrior  # of training and of the Laplace fit

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


def prepare(cfg: TrialConfig, *, adapter: Path | None = None, log=print) -> FineTuned:
    """The trial before training: data, backbone, the PEFT method (fresh, or the saved ``adapter``
    loaded on top, trainable) and the Gaussian prior its training and its Laplace fit share: θ₀ read
    from the fresh adapter, or the θ₀ saved beside ``adapter`` (:mod:`distlap.finetune.anchor`)."""
    from peft import PeftModel

    splits, backbone, transform, device = _prepared(cfg, log)
    if adapter is None:
        model = LogitsModel(apply_peft(backbone, cfg.peft))
        means = prior_mean(model, cfg.train.prior_anchor)
    else:
        model = LogitsModel(PeftModel.from_pretrained(backbone, adapter, is_trainable=True))
        means = load_prior_mean(adapter, model)
    model = model.to(device)
    tuned = tuned_params(model.model)
    prior = GaussianPrior(cfg.train.prior_precision, means, n_train=len(splits.train))
    return FineTuned(cfg, model, transform, splits, TrainResult(status="ok"), tuned, device, prior)


def train(ft: FineTuned, *, log=print, on_epoch=None, resume: dict | None = None) -> FineTuned:
    """Train ``ft`` to its MAP (``on_epoch(row, state)``, ``resume``: see :func:`fit_map`); a failed
    training (non-finite loss) is in ``ft.train.status``."""
    cfg = ft.cfg

    def epoch_done(row: dict, state: dict) -> None:
        log(_epoch_line(row, cfg.train.epochs))
        if on_epoch is not None:
            on_epoch(row, state)

    loader = ft.loader("train", batch_size=cfg.train.batch_size, shuffle=True)
    ft.train = fit_map(
        ft.model,
        loader,
        ft.loader("val"),
        cfg.train,
        ft.device,
        prior=ft.prior,
        n_bins=cfg.n_bins,
        on_epoch=epoch_done,
        resume=resume,
        log=log,
    )
    if ft.train.status != "ok":
        log(f"[distlap] fine-tuning FAILED: {ft.train.message}")
    else:
        _log_stationarity(ft.train, cfg.train, log)
    return ft


def _log_stationarity(result: TrainResult, cfg: TrainConfig, log) -> None:
    ratio = f"stationarity {result.stationarity:.2e} (||grad log joint|| / ||grad NLL||"
    if cfg.regime == "posthoc":  # what posthoc assumes is said once per run, not once per trial
        log(f"[distlap] posthoc: theta-hat after {cfg.epochs} epochs, {ratio}; a mode has 0)")
        return
    log(f"[distlap] L-BFGS: {result.lbfgs_steps} steps to {ratio}; target {cfg.stationarity_tol:g})")
    if result.stationarity > cfg.stationarity_tol:
        log("[distlap] WARNING: theta* is not a mode of the posterior; Laplace assumes one")


def fine_tune(cfg: TrialConfig, *, log=print) -> FineTuned:
    """Fine-tune ``cfg`` to its MAP: :func:`prepare`, then :func:`train`."""
    ft = prepare(cfg, log=log)
    t = ft.tuned
    log(
        f"[distlap] {cfg.peft.method} on {cfg.backbone.name}: {t.trainable:,} of {t.total:,} "
        f"parameters tuned ({t.pct:.2f}%)"
    )
    return train(ft, log=log)


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"[distlap] epoch {row['epoch']}/{epochs}: train loss {row[names.TRAIN_LOSS]:.4f}, "
        f"val acc {row[names.epoch_score('accuracy')]:.4f}, val ece {row[names.epoch_score('ece')]:.4f} "
        f"({row[names.EPOCH_TIME]:.1f}s)"
    )


def save_adapter(ft: FineTuned, folder: Path) -> None:
    """The peft adapter (with the trained head, a ``modules_to_save``) and its prior mean θ₀ beside it:
    ``PeftModel.from_pretrained(backbone, folder)`` loads the first, :func:`prepare` both."""
    ft.peft_model.save_pretrained(folder)
    save_prior_mean(ft.prior.means, folder)


def save_fine_tuned(ft: FineTuned, path: Path) -> None:
    """The adapter with θ₀ (:func:`save_adapter`) and the training record."""
    save_adapter(ft, path / ADAPTER_DIR)
    (path / HISTORY_FILE).write_text(json.dumps(dataclasses.asdict(ft.train)))


def restore_fine_tuned(cfg: TrialConfig, path: Path, *, log=print) -> FineTuned:
    """What :func:`fine_tune` returned, rebuilt from :func:`save_fine_tuned`'s folder without training:
    same data split, backbone and fresh head, the adapter loaded on top (trainable, so that the Laplace
    stage sees its parameters), the same prior."""
    ft = prepare(cfg, adapter=path / ADAPTER_DIR, log=log)
    ft.train = TrainResult(**json.loads((path / HISTORY_FILE).read_text()))
    return ft
