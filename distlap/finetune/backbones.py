"""Backbones: any Hugging Face ViT image classifier through ``from_pretrained``, with a fresh head.

A backbone is named by a hub id (``google/vit-base-patch16-224``), a local directory written by
``save_pretrained``, or one of distlap's own tiny ViTs (:data:`distlap.zoo.TINY_BACKBONES`). The tiny ones are
pretrained by :mod:`distlap.finetune.pretrain` on the *upstream* classes of their data set the first time they
are asked for, saved with ``save_pretrained`` into a cache, and from then on loaded exactly like a hub
model, so the embedded default exercises the same loading code as ViT-B/16 on a cluster.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from distlap.finetune.data import ImageTransform
from distlap.finetune.pretrain import resolve

_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded; the message names it and the fix."""


def load_backbone(
    name: str, num_labels: int, *, cache_dir: str | None = None, seed: int = 0, data_path: str | None = None
) -> tuple[nn.Module, ImageTransform]:
    """Load a ViT classifier with a freshly initialised ``num_labels``-way head, and its input transform.

    The head is always re-initialised (seeded), even when the checkpoint's head has the same size:
    the upstream head's classes mean nothing downstream.
    """
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # mismatched-head warnings are expected here
    source = resolve(name, cache_dir, data_path)
    try:
        model = AutoModelForImageClassification.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - transformers, safetensors and torch raise many types
        raise _load_error(name, source, err) from None
    replace_head(model, num_labels, seed)
    return model, _transform_for(source, model)


def _load_error(name: str, source: str, err: Exception) -> BackboneError:
    """One message naming what could not be loaded and the fix: a local directory's files, or the hub."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if os.path.isdir(source):
        weights = [os.path.join(source, f) for f in _WEIGHTS if os.path.isfile(os.path.join(source, f))]
        what = f"{weights[0]} is corrupt or truncated" if weights else f"{source} holds no model weights"
        return BackboneError(
            f"could not load backbone {name!r}: {what} ({type(err).__name__}: {first_line}). Fix: write "
            f"it again with `model.save_pretrained({source!r})` (or copy it again from where it was made)"
        )
    return BackboneError(
        f"could not load backbone {name!r}: it is not a local directory and the hub did not "
        f"provide it ({first_line}). Fix: on a machine that reaches the hub run "
        f"`AutoModelForImageClassification.from_pretrained({name!r}).save_pretrained(DIR)` "
        f"(and the image processor likewise), copy DIR here and pass backbone.name=DIR."
    )


def replace_head(model: nn.Module, num_labels: int, seed: int) -> None:
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise BackboneError(
            f"{type(model).__name__} has no linear `classifier` head; distlap supports "
            "ViT-style image classifiers (ViTForImageClassification and kin)"
        )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.classifier = nn.Linear(head.in_features, num_labels)
    torch.random.set_rng_state(generator_state)
    model.config.num_labels = num_labels
    model.config.id2label = {i: str(i) for i in range(num_labels)}
    model.config.label2id = {str(i): i for i in range(num_labels)}


def _transform_for(source: str, model: nn.Module) -> ImageTransform:
    """Image size, channels and normalisation from the checkpoint's image processor (or its config)."""
    from transformers import AutoImageProcessor

    cfg = model.config
    try:
        proc = AutoImageProcessor.from_pretrained(source)
        mean, std = list(proc.image_mean), list(proc.image_std)
    except (OSError, ValueError, AttributeError):
        mean, std = [0.5] * cfg.num_channels, [0.5] * cfg.num_channels
    return ImageTransform(cfg.image_size, cfg.num_channels, mean, std)
