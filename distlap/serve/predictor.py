"""The exported predictor, and MLflow's pyfunc loader module (``loader_module="distlap.serve.predictor"``).

``mlflow.pyfunc.load_model(DIR)`` calls :func:`_load_pyfunc` on the folder :mod:`distlap.serve.build`
wrote; ``predict(images)`` takes raw images as the data set gives them (uint8, (B, H, W) grey or
(B, H, W, 3) RGB), applies the trial's transform and returns the probit GLM probabilities (B, C) of the
subset's restricted posterior at its λ: the trial's own predictive of that subset. The checksums are
verified before anything is loaded. Nothing here imports Ray, Optuna or MLflow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distlap.bayes import glm_posterior
from distlap.bayes.glm_posterior import GLMPosterior
from distlap.finetune.data import ImageTransform
from distlap.finetune.train import LogitsModel
from distlap.serve.bundle import ADAPTER_DIR, BACKBONE_DIR, POSTERIOR_FILE, Spec, verify

BATCH = 256


class InputError(ValueError):
    """Images the predictor cannot take; the message names what it got and what it takes."""


@dataclass(frozen=True)
class Predictor:
    """The network (backbone + adapter), the subset's posterior, the transform and the spec."""

    spec: Spec
    model: nn.Module
    posterior: GLMPosterior
    transform: ImageTransform

    @classmethod
    def load(cls, folder: Path) -> Predictor:
        folder = Path(folder)
        verify(folder)
        spec = Spec.read(folder)
        t = spec.transform
        return cls(
            spec,
            network(folder),
            glm_posterior.load(folder / POSTERIOR_FILE),
            ImageTransform(t.image_size, t.num_channels, t.mean, t.std),
        )

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        """Class probabilities (B, C) float32 of raw uint8 images (module docstring)."""
        pixels = self.pixels(model_input)
        probs = [
            self.posterior.probs(self.model, self.transform(chunk), self.spec.blocks)
            for chunk in pixels.split(BATCH)
        ]
        return torch.cat(probs).numpy()

    def pixels(self, images) -> torch.Tensor:
        """uint8 (B, C, H, W) from the data set's layout, or an :class:`InputError`."""
        array = np.asarray(images)
        height, width, channels = self.spec.input_shape
        expected = (height, width) if channels == 1 else (height, width, channels)
        if array.dtype != np.uint8 or array.ndim != len(expected) + 1 or array.shape[1:] != expected:
            raise InputError(
                f"images of shape {array.shape} and dtype {array.dtype}: this model takes uint8 arrays of "
                f"shape (B, {', '.join(map(str, expected))}), as the data set gives them"
            )
        if len(array) == 0:
            raise InputError("no images: pass at least one (a batch of shape (B, ...) with B >= 1)")
        x = torch.from_numpy(np.ascontiguousarray(array))
        return x[:, None] if channels == 1 else x.permute(0, 3, 1, 2).contiguous()


def network(folder: Path) -> LogitsModel:
    """The backbone copy with the adapter loaded on top (frozen, eval mode), pixel_values -> logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    backbone = AutoModelForImageClassification.from_pretrained(folder / BACKBONE_DIR)
    with warnings.catch_warnings():  # peft's own use of a deprecated transformers name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return LogitsModel(PeftModel.from_pretrained(backbone, folder / ADAPTER_DIR)).eval()


def _load_pyfunc(data_path: str) -> Predictor:
    """MLflow's entry point for ``loader_module`` models: the predictor in ``data_path``."""
    return Predictor.load(Path(data_path))
