"""The predictor folder (:mod:`distlap.serve.bundle`) written from one trial's files and one subset.

From ``trials/<id>/``: ``config.yaml`` (the data set, hence the transform, the input shape and the
classes; the backbone), ``adapter/`` (the peft adapter with the head, and θ₀) and
``glm_posterior.safetensors`` (every block's posterior at the trial's global λ, written by the trial),
restricted to the subset's blocks. The backbone is loaded as the trial loaded it (distlap's tiny ViTs,
a local folder or a hub id, with its seeded head) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from distlap import names
from distlap.bayes import glm_posterior
from distlap.config import TrialConfig
from distlap.finetune.backbones import load_backbone
from distlap.finetune.data import ImageTransform, load_splits
from distlap.finetune.run import ADAPTER_DIR as TRIAL_ADAPTER
from distlap.serve.bundle import ADAPTER_DIR, BACKBONE_DIR, POSTERIOR_FILE, Spec, Transform, write_checksums


@dataclass(frozen=True)
class Source:
    """What is exported: the trial's folder and config, the subset's name and blocks, and where it came
    from (sweep, trial id, the report's row: recorded in ``predictor.json``)."""

    trial_dir: Path
    cfg: TrialConfig
    subset: str
    blocks: tuple[int, ...]
    origin: dict


def build(source: Source, folder: Path) -> Spec:
    """Write the predictor folder for ``source`` into ``folder`` (created; it must not exist)."""
    cfg = source.cfg
    folder.mkdir(parents=True)
    splits = load_splits(cfg.data, seed=cfg.seed)
    backbone, transform = load_backbone(
        cfg.backbone.name,
        splits.num_classes,
        cache_dir=cfg.backbone.cache_dir,
        seed=cfg.seed,
        data_path=cfg.data.path,
    )
    backbone.save_pretrained(folder / BACKBONE_DIR)
    shutil.copytree(source.trial_dir / TRIAL_ADAPTER, folder / ADAPTER_DIR)
    full = glm_posterior.load(source.trial_dir / names.POSTERIOR_FILE)
    glm_posterior.save(full.restrict(source.blocks), folder / POSTERIOR_FILE)
    channels, height, width = splits.train.tensors[0].shape[1:]
    spec = Spec(
        subset=source.subset,
        blocks=list(source.blocks),
        prior_precision=full.prior_precision,
        backbone=cfg.backbone.name,
        transform=_transform(transform),
        input_shape=[int(height), int(width), int(channels)],
        classes=list(splits.class_names),
        origin=source.origin,
    )
    spec.write(folder)
    write_checksums(folder)
    return spec


def _transform(t: ImageTransform) -> Transform:
    return Transform(t.image_size, t.num_channels, t.mean.flatten().tolist(), t.std.flatten().tolist())
