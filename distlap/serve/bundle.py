"""The predictor folder: its layout, its settings (``predictor.json``) and the SHA-256 of every file.

```
predictor/
  predictor.json              Spec: the subset, λ, the predictive, the transform, the input, the trial
  backbone/                   save_pretrained copy of the backbone (config.json, model.safetensors)
  adapter/                    the peft adapter (with the head) and the prior mean θ₀ (safetensors)
  posterior.safetensors       the subset's posterior at λ (distlap.bayes.glm_posterior)
  checksums.json              SHA-256 of each file above, checked before anything is loaded
```

Tensors are safetensors, settings JSON: nothing in the folder is a pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPEC_FILE, CHECKSUMS_FILE = "predictor.json", "checksums.json"
BACKBONE_DIR, ADAPTER_DIR, POSTERIOR_FILE = "backbone", "adapter", "posterior.safetensors"
FORMAT = 1


class ModelFolderError(ValueError):
    """A predictor folder that cannot be trusted: a file missing, altered or unexpected."""


@dataclass(frozen=True)
class Transform:
    """:class:`distlap.finetune.data.ImageTransform`'s settings."""

    image_size: int
    num_channels: int
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class Spec:
    """What the predictor is: the subset's blocks and λ, the probit GLM predictive, the data transform,
    the images it takes (height, width, channels, as the data set gives them), the class names, the
    backbone's identifier and where it all came from (sweep, trial, the report's row)."""

    subset: str
    blocks: list[int]
    prior_precision: float
    backbone: str
    transform: Transform
    input_shape: list[int]  # [height, width, channels]
    classes: list[str]
    origin: dict = field(default_factory=dict)
    predictive: str = "glm"
    link: str = "probit"
    format: int = FORMAT

    def write(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, folder: Path) -> Spec:
        raw = json.loads((folder / SPEC_FILE).read_text())
        return cls(**{**raw, "transform": Transform(**raw["transform"])})


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != CHECKSUMS_FILE
    )


def write_checksums(folder: Path) -> None:
    """``checksums.json``: the SHA-256 of every file of ``folder`` (the last file written)."""
    sums = {name: sha256(folder / name) for name in _files(folder)}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=2))


def verify(folder: Path) -> None:
    """Every file recorded at export is there and unchanged, and no other file is: else one line
    naming the file and the fix."""
    fix = "export the model again (python -m distlap.export SWEEP_DIR --output DIR)"
    record = folder / CHECKSUMS_FILE
    if not record.is_file():
        raise ModelFolderError(f"model folder {folder}: {CHECKSUMS_FILE} is missing; {fix}")
    try:
        sums = json.loads(record.read_text())
    except ValueError:
        raise ModelFolderError(f"model folder {folder}: {CHECKSUMS_FILE} is not JSON; {fix}") from None
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise ModelFolderError(f"model folder {folder}: {name} is missing; {fix}")
        if sha256(path) != digest:
            raise ModelFolderError(f"model folder {folder}: {name} was altered (SHA-256 differs); {fix}")
    extra = sorted(set(_files(folder)) - set(sums))
    if extra:
        raise ModelFolderError(f"model folder {folder}: {extra[0]} was not exported; remove it or {fix}")
