"""Offline, deterministic distribution-shift and OOD data: corruptions, near-OOD, far-OOD, CIFAR-10-C, SVHN.

Images are uint8 (N, C, H, W) with C in {1, 3}, as in :mod:`distlap.finetune.data`; every function returns the
same layout, so the task's ``ImageTransform`` and ``make_loader`` serve them unchanged.

Corruptions follow Hendrycks & Dietterich (2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations"; their CIFAR-10-C code is the model), severities 1-5. Parameters in
[0, 1] pixel units; ``s = H / 32`` scales lengths from CIFAR's 32 px (28 px: s = 0.875):

    corruption      severity 1 .. 5                  operation (torchvision.transforms.v2.functional)
    gaussian_noise  sigma .04 .06 .08 .09 .10        x + N(0, sigma^2), clipped; seeded torch.Generator
    gaussian_blur   sigma .4 .6 .7 .8 1.0 (* s px)   gaussian_blur, kernel 2 int(4 sigma + .5) + 1
    contrast        c .75 .5 .4 .3 .15               adjust_contrast: c x + (1 - c) mean(grey x)
    rotation        10 20 30 40 50 degrees           rotate, bilinear, zero fill; sign +-1 seeded per image
    pixelate        f .95 .9 .85 .75 .65             resize to int(f H) (antialiased), back: nearest-exact

Differences from the model, all documented choices: torchvision has no seedable noise op, so noise is
drawn here; blur pads by reflection (skimage: nearest); contrast blends towards the grey mean
(H&D: per-channel means; identical for 1 channel); pixelate's down-sampling is antialiased bilinear
and its up-sampling pixel-centre nearest (H&D: PIL BOX both ways; torch's legacy "nearest" is off by
half a pixel and makes the distance to the original non-monotone in the severity). Rotation is not in
CIFAR-10-C (rotated-MNIST shift studies, e.g. Ovadia et al. 2019, go to 180 degrees); we stop at 50
degrees because beyond ~60 the pixel distance to the original falls again (the zero corners shrink
towards 90), so a larger angle would not be a larger shift by that measure.
Values are rounded to uint8. Same seed -> identical bytes; only noise and rotation use the seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from distlap.finetune.data import DataError

SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "rotation": (10.0, 20.0, 30.0, 40.0, 50.0),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
CIFAR10C_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
DIGITS_SIZE = 1797  # sklearn's bundled 8x8 digits (UCI optical digits test set)


def _check_images(images: Tensor) -> Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 (N, C, H, W) with C in {{1, 3}}, got {images.dtype} {tuple(images.shape)}"
        )
    return images


def _param(corruption: str, severity: int) -> float:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(
            f"severity must be an integer in 1..5 (Hendrycks & Dietterich 2019), got "
            f"{severity!r} for {corruption}"
        )
    return SEVERITIES[corruption][severity - 1]


def _to_uint8(x: Tensor) -> Tensor:
    """float in [0, 1] -> uint8 by rounding."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def gaussian_noise(images: Tensor, severity: int, *, seed: int = 0) -> Tensor:
    """x + N(0, sigma^2) per pixel and channel in [0, 1] units, clipped, rounded; noise from ``seed``."""
    images, sigma = _check_images(images), _param("gaussian_noise", severity)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g, dtype=torch.float32)  # (N, C, H, W)
    return _to_uint8(images.float() / 255 + sigma * noise)


def gaussian_blur(images: Tensor, severity: int, *, seed: int = 0) -> Tensor:
    """Gaussian blur with sigma = table * H / 32 px, kernel truncated at 4 sigma (as skimage)."""
    images = _check_images(images)
    sigma = _param("gaussian_blur", severity) * images.shape[-2] / 32
    radius = max(1, int(4 * sigma + 0.5))
    radius = min(radius, min(images.shape[-2:]) - 1)  # reflection padding needs radius < image side
    return TF.gaussian_blur(images, [2 * radius + 1] * 2, [sigma, sigma])


def contrast(images: Tensor, severity: int, *, seed: int = 0) -> Tensor:
    """c x + (1 - c) mean, the mean of each image's grey version (torchvision's adjust_contrast)."""
    images, factor = _check_images(images), _param("contrast", severity)
    return TF.adjust_contrast(images, factor)


def rotation(images: Tensor, severity: int, *, seed: int = 0) -> Tensor:
    """Rotate each image by +-angle about its centre (bilinear, zero fill); signs drawn from ``seed``."""
    images, angle = _check_images(images), _param("rotation", severity)
    sign = torch.randint(0, 2, (images.shape[0],), generator=torch.Generator().manual_seed(seed)).bool()
    out = torch.empty_like(images)
    for mask, a in ((sign, angle), (~sign, -angle)):
        if mask.any():
            out[mask] = TF.rotate(images[mask], a, interpolation=TF.InterpolationMode.BILINEAR, fill=[0.0])
    return out


def pixelate(images: Tensor, severity: int, *, seed: int = 0) -> Tensor:
    """Down-sample to int(f H) x int(f W) (antialiased bilinear), back up with pixel-centre nearest."""
    images, f = _check_images(images), _param("pixelate", severity)
    h, w = images.shape[-2:]
    small = TF.resize(images, [int(f * h), int(f * w)], antialias=True)
    return TF.resize(small, [h, w], interpolation=TF.InterpolationMode.NEAREST_EXACT)


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "rotation": rotation,
    "pixelate": pixelate,
}


def corrupt(images: Tensor, corruption: str, severity: int, *, seed: int = 0) -> Tensor:
    """Apply the named corruption (a key of :data:`CORRUPTIONS`) at ``severity`` 1..5; uint8 in and out."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {sorted(CORRUPTIONS)}, got {corruption!r}")
    return CORRUPTIONS[corruption](images, severity, seed=seed)


# ------------------------------------------------------------------------------------------- near OOD


def held_out_classes(
    images: Tensor,
    labels: Tensor,
    fine_tuned_classes: Sequence[int],
    ood_classes: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Near-OOD inputs: test examples of the data set's classes the fine-tuned head never saw.

    ``images`` (N, C, H, W) uint8 and ``labels`` (N,) in the data set's ORIGINAL class ids (before
    ``data.classes`` relabelling); ``fine_tuned_classes`` are those ids of the task. Returns the examples
    of ``ood_classes`` (default: every other class present), labels keeping their original ids.
    """
    images, labels = _check_images(images), torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    seen = sorted({int(c) for c in fine_tuned_classes})
    present = sorted({int(c) for c in labels.unique()})
    if ood_classes is None:
        chosen = [c for c in present if c not in seen]
    else:
        chosen = sorted({int(c) for c in ood_classes})
    overlap = sorted(set(chosen) & set(seen))
    if overlap:
        raise ValueError(
            f"ood_classes {chosen} and fine_tuned_classes {seen} overlap in {overlap}: near-OOD "
            "classes must be ones the head never saw"
        )
    keep = torch.isin(labels, torch.tensor(chosen, dtype=torch.long))
    if not keep.any():
        raise ValueError(
            f"no test example has a class outside fine_tuned_classes {seen} (ood_classes "
            f"{chosen}; classes present: {present})"
        )
    return images[keep], labels[keep]


# -------------------------------------------------------------------------------------------- far OOD


def digits_ood(n: int, image_size: int, num_channels: int, *, seed: int = 0) -> Tensor:
    """Far-OOD inputs: ``n`` of scikit-learn's bundled 8x8 digits (no download), a seeded subsample
    without replacement, scaled 0..16 -> 0..255, resized (antialiased bilinear) to ``image_size`` and
    repeated to ``num_channels``: uint8 (n, num_channels, image_size, image_size), the task's raw layout."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= DIGITS_SIZE:
        raise ValueError(f"n must be an integer in 1..{DIGITS_SIZE} (the bundled digits), got {n!r}")
    if num_channels not in (1, 3) or image_size < 1:
        raise ValueError(f"need num_channels 1 or 3 and image_size >= 1, got {num_channels}, {image_size}")
    from sklearn.datasets import load_digits  # local: only far-OOD evaluation needs scikit-learn

    digits = load_digits().images  # (1797, 8, 8) float, 0..16
    pick = np.sort(np.random.default_rng(seed).choice(DIGITS_SIZE, n, replace=False))
    x = torch.from_numpy(np.round(digits[pick] * 255 / 16)).to(torch.uint8)[:, None]  # (n, 1, 8, 8)
    x = TF.resize(x, [image_size, image_size], antialias=True)
    return x.expand(-1, num_channels, -1, -1).contiguous()


# ------------------------------------------------------------------------------- CIFAR-10-C and SVHN

_CIFAR10C_FIX = (
    "Fix: download CIFAR-10-C (Hendrycks & Dietterich 2019), extract CIFAR-10-C.tar and "
    "pass the extracted folder (it holds <corruption>.npy and labels.npy)"
)


def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10-C file {path!r} does not exist. {_CIFAR10C_FIX}")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read {path!r} as a .npy array ({err}); re-extract it. {_CIFAR10C_FIX}"
        ) from None


def load_cifar10c(folder: str | os.PathLike, corruption: str, severity: int) -> tuple[Tensor, Tensor]:
    """One corruption at one severity of CIFAR-10-C: images uint8 (n, 3, 32, 32), labels int64 (n,).

    ``<corruption>.npy`` is (5 n, 32, 32, 3) uint8, severities 1..5 stacked (n = 10,000 in the release);
    ``labels.npy`` is (5 n,). Only the requested block is read (memory-mapped).
    """
    folder = os.fspath(folder)
    if corruption not in CIFAR10C_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {list(CIFAR10C_CORRUPTIONS)}, got {corruption!r}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if not os.path.isdir(folder):
        raise DataError(f"CIFAR-10-C folder {folder!r} does not exist. {_CIFAR10C_FIX}")
    images = _load_npy(os.path.join(folder, f"{corruption}.npy"))
    labels = _load_npy(os.path.join(folder, "labels.npy"))
    ok = images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
    if not ok or images.shape[0] % 5 or labels.shape != (images.shape[0],):
        raise DataError(
            f"CIFAR-10-C in {folder!r} is malformed: {corruption}.npy is {images.dtype} "
            f"{images.shape} and labels.npy {labels.shape}; expected uint8 (5 n, 32, 32, 3) and "
            f"(5 n,). {_CIFAR10C_FIX}"
        )
    n = images.shape[0] // 5
    block = slice((severity - 1) * n, severity * n)
    x = torch.from_numpy(np.ascontiguousarray(images[block].transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(np.asarray(labels[block]).astype(np.int64))


def load_svhn_test(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """SVHN's test split from ``test_32x32.mat`` (a path to it, or its folder), read with scipy.io.loadmat:
    images uint8 (N, 3, 32, 32) and labels int64 (N,), the digit 0 mapped from the file's label 10."""
    from scipy.io import loadmat

    path = os.fspath(path)
    path = os.path.join(path, "test_32x32.mat") if os.path.isdir(path) else path
    fix = (
        "Fix: download SVHN's cropped-digits test_32x32.mat (Netzer et al. 2011) and pass its path or folder"
    )
    if not os.path.isfile(path):
        raise DataError(f"SVHN file {path!r} does not exist. {fix}")
    try:
        mat = loadmat(path)
    except Exception as err:  # noqa: BLE001 - scipy raises several types for a broken file
        raise DataError(
            f"cannot read {path!r} as a MATLAB file ({type(err).__name__}: {err}). {fix}"
        ) from None
    x, y = mat.get("X"), mat.get("y")
    if (
        x is None
        or y is None
        or x.dtype != np.uint8
        or x.ndim != 4
        or x.shape[:3] != (32, 32, 3)
        or y.size != x.shape[3]
    ):
        found = {k: f"{v.dtype} {v.shape}" for k, v in mat.items() if not k.startswith("__")}
        raise DataError(
            f"{path!r} is not SVHN's test_32x32.mat: need X uint8 (32, 32, 3, N) and y (N, 1), "
            f"got {found}. {fix}"
        )
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64) % 10)
    return images, labels
