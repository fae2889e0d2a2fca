"""A trial's Ray Tune checkpoints: after every epoch, when fine-tuning ends, after the Laplace fit.

A preempted spot worker or a retried trial resumes where its last checkpoint left it, with the same
numbers: mid-training from the adapter and the optimiser state (:func:`distlap.finetune.train.fit_map`'s
``resume``), after training from the adapter and the training record, after the fit from those and the
laplace-torch ``state_dict`` of the fit. Every checkpoint folder is complete on its own.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from ray import tune

from distlap.config import TrialConfig
from distlap.finetune.run import (
    ADAPTER_DIR,
    HISTORY_FILE,
    FineTuned,
    prepare,
    restore_fine_tuned,
    save_adapter,
)

TRAIN_STATE = "train_state.pt"  # fit_map's state after the last finished epoch (training unfinished)
LAPLACE_FIT = "laplace_fit.pt"  # the Laplace fit's state_dict


@dataclass
class Restored:
    """What the trial's latest checkpoint holds: a prepared model (adapter loaded), and either the state
    to resume training from, or the finished training (``ft.train``) and perhaps the Laplace fit."""

    ft: FineTuned
    train_state: dict | None = None
    laplace_fit: dict | None = None

    @property
    def trained(self) -> bool:
        return self.train_state is None


def restore(cfg: TrialConfig, log) -> Restored | None:
    """The trial's latest checkpoint, or None for a first attempt."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder)
        if (path / TRAIN_STATE).is_file():
            state = torch.load(path / TRAIN_STATE, weights_only=False)
            return Restored(prepare(cfg, adapter=path / ADAPTER_DIR, log=log), train_state=state)
        fit = torch.load(path / LAPLACE_FIT, weights_only=False) if (path / LAPLACE_FIT).is_file() else None
        return Restored(restore_fine_tuned(cfg, path, log=log), laplace_fit=fit)


def report(ft: FineTuned, metrics: dict, *, train_state: dict | None = None, laplace_fit: dict | None = None):
    """``tune.report`` with a complete checkpoint of ``ft`` (Tune persists it before returning)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        save_adapter(ft, path / ADAPTER_DIR)
        if train_state is not None:
            torch.save(train_state, path / TRAIN_STATE)
        else:
            (path / HISTORY_FILE).write_text(json.dumps(asdict(ft.train)))
        if laplace_fit is not None:
            torch.save(laplace_fit, path / LAPLACE_FIT)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(path))
