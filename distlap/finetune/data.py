"""Data sets, splits and loaders.

Everything stays uint8 in memory: :class:`Splits` holds images (N, C, H, W) uint8 with labels
(N,) int64 in 0..k-1. Resizing, channel conversion and normalisation happen per batch in the
loader (:class:`ImageTransform`), so one copy of the data serves every backbone.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from distlap.config import DataConfig
from distlap.zoo import CIFAR_HUB_IDS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR

# idx header: two zero bytes, a dtype code, the number of dims; then each dim as big-endian uint32.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# One random stream per purpose, so e.g. changing max_train never moves the train/val partition.
_VAL_STREAM, _TRAIN_CAP, _VAL_CAP, _TEST_CAP = range(4)


class DataError(RuntimeError):
    """A data set that cannot be found or read; the message names the problem and the fix."""


@dataclass(frozen=True)
class Splits:
    """train / val / test, each ``TensorDataset(images uint8 (N, C, H, W), labels int64 (N,))``.

    Labels are already remapped to 0..num_classes-1; ``class_names[i]`` names label ``i``.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    class_names: list[str]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or plain, into an array of its shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read idx file {str(path)!r}: {err}; re-install or re-download it") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{str(path)!r} is not an idx file (bad magic 0x{raw[:4].hex()}); re-install or re-download it"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if len(raw) >= header else None
    if dims is None or len(raw) != header + int(np.prod(dims)) * dtype.itemsize:
        raise DataError(
            f"idx file {str(path)!r} is truncated or has trailing bytes (header says "
            f"shape {dims}, file holds {len(raw)} bytes); re-install or re-download it"
        )
    # astype copies into a writable array in native byte order.
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# --- raw data sets: (train images, train labels, test images, test labels, class names) ---------

_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def _load_fashion_mnist(path: str | None) -> _Raw:
    """Fashion-MNIST from its four idx files; images become (N, 1, 28, 28) uint8."""
    directory = path or FASHION_MNIST_DIR
    fix = (
        "Fix: `apt-get install dataset-fashion-mnist` (installs to "
        f"{FASHION_MNIST_DIR}) or set data.path=<dir with the idx files>."
    )
    if not os.path.isdir(directory):
        raise DataError(f"Fashion-MNIST directory {directory!r} does not exist. {fix}")

    def read(stem: str) -> np.ndarray:
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(directory, name)):
                return read_idx(os.path.join(directory, name))
        raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {directory!r}. {fix}")

    arrays = [
        read(f"{part}-{kind}")
        for part in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    for images, labels in (arrays[0:2], arrays[2:4]):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST files in {directory!r} disagree (images {images.shape}, "
                f"labels {labels.shape}); re-install them. {fix}"
            )
    train_x, train_y, test_x, test_y = arrays
    return train_x[:, None], train_y, test_x[:, None], test_y, list(FASHION_MNIST_CLASSES)


def _load_cifar(dataset: str, path: str | None) -> _Raw:
    """CIFAR-10/100 through HF ``datasets`` (a ``save_to_disk`` dir or a hub id); (N, 3, H, W) uint8."""
    import datasets  # local: importing datasets is slow and Fashion-MNIST does not need it

    source = path or CIFAR_HUB_IDS[dataset]
    dd = _hf_dataset(dataset, source)
    splits = list(dd) if isinstance(dd, datasets.DatasetDict) else []
    if "train" not in splits or "test" not in splits:
        raise DataError(
            f"{dataset} at {source!r} needs splits 'train' and 'test' but holds {splits or type(dd).__name__}"
        )
    features = dd["train"].features
    image_col = next((c for c in ("img", "image") if c in features), None)
    label_col = "fine_label" if dataset == "cifar100" and "fine_label" in features else "label"
    if image_col is None or label_col not in features:
        raise DataError(
            f"{dataset} at {source!r} needs an image column ('img' or 'image') and a "
            f"{label_col!r} column but has columns {list(features)}"
        )
    train_x, train_y = _hf_arrays(dd["train"], image_col, label_col, source)
    test_x, test_y = _hf_arrays(dd["test"], image_col, label_col, source)
    if isinstance(features[label_col], datasets.ClassLabel):
        names = list(features[label_col].names)
    else:
        names = [str(i) for i in range(int(max(train_y.max(), test_y.max())) + 1)]
    return train_x, train_y, test_x, test_y, names


def _hf_dataset(dataset: str, source: str):
    """``load_from_disk`` for a directory, else ``load_dataset`` of a hub id; one DataError with the fix."""
    import datasets

    if os.path.isdir(source):
        try:
            return datasets.load_from_disk(source)
        except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
            raise DataError(
                f"{source!r} is not a directory written by `save_to_disk` "
                f"({type(err).__name__}: {str(err).splitlines()[0]}). Fix: point "
                "data.path at the folder `DatasetDict.save_to_disk` wrote."
            ) from None
    try:
        return datasets.load_dataset(source)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: one fix for all
        raise DataError(
            f"cannot load {dataset} from the hub id {source!r} (and no directory of that name "
            f"exists): {type(err).__name__}: {str(err).splitlines()[0]}. Fix: on a machine "
            f"with internet run `datasets.load_dataset({source!r}).save_to_disk(DIR)`, copy DIR "
            "here and set data.path=DIR."
        ) from None


def _hf_arrays(split, image_col: str, label_col: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One HF split -> images (N, 3, H, W) uint8, labels (N,); decoded in one vectorised pass."""
    import datasets

    split = split.select_columns([image_col, label_col])
    if isinstance(split.features[image_col], datasets.Image):
        # Decode every picture as RGB, so a stray grey or RGBA image cannot break the stacking.
        split = split.cast_column(image_col, datasets.Image(mode="RGB"))
    batch = split.with_format("numpy")[:]
    images, labels = batch[image_col], batch[label_col]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"images in column {image_col!r} of {source!r} are not equally sized RGB "
            f"pictures (got an array of shape {images.shape}, dtype {images.dtype})"
        )
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


# --- splits --------------------------------------------------------------------------------------


def _keep_classes(
    images: np.ndarray, labels: np.ndarray, classes: list[int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep only ``classes`` and relabel them 0..k-1 in the given order."""
    lookup = np.full(num_classes, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    new = lookup[labels]
    keep = new >= 0
    return images[keep], new[keep]


def _subsample(indices: np.ndarray, cap: int | None, seed: int, stream: int) -> np.ndarray:
    """A seeded random subset of at most ``cap`` indices, in ascending order."""
    if cap is None or cap >= len(indices):
        return indices
    return np.sort(np.random.default_rng([seed, stream]).choice(indices, cap, replace=False))


def load_raw(dataset: str, path: str | None) -> _Raw:
    """The whole data set, its original labels and class names: (train images, train labels, test
    images, test labels, class names), images (N, C, H, W) uint8."""
    raw = _load_fashion_mnist(path) if dataset == "fashion_mnist" else _load_cifar(dataset, path)
    names = raw[4]
    for labels in (raw[1], raw[3]):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(
                f"{dataset} labels span {labels.min()}..{labels.max()} but the data "
                f"set names {len(names)} classes; the files are corrupt"
            )
    return raw


def _task_classes(raw: _Raw, cfg: DataConfig) -> _Raw:
    """Only ``cfg.classes``, relabelled 0..k-1 in that order (all classes when None)."""
    train_x, train_y, test_x, test_y, names = raw
    if cfg.classes is None:
        return raw
    if max(cfg.classes) >= len(names):
        raise DataError(
            f"data.classes={cfg.classes} names class {max(cfg.classes)} but "
            f"{cfg.dataset} has {len(names)} classes (ids 0..{len(names) - 1})"
        )
    train_x, train_y = _keep_classes(train_x, train_y, cfg.classes, len(names))
    test_x, test_y = _keep_classes(test_x, test_y, cfg.classes, len(names))
    return train_x, train_y, test_x, test_y, [names[c] for c in cfg.classes]


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load ``cfg.dataset`` and split it: val = a seeded share of train, test = the original test."""
    train_x, train_y, test_x, test_y, names = _task_classes(load_raw(cfg.dataset, cfg.path), cfg)
    n = len(train_y)
    if n < 2 or len(test_y) == 0:
        raise DataError(
            f"{cfg.dataset} with data.classes={cfg.classes} leaves {n} training and "
            f"{len(test_y)} test examples; choose classes present in the data"
        )
    # At least one example on each side, whatever the fraction.
    n_val = min(max(round(cfg.val_fraction * n), 1), n - 1)
    perm = np.random.default_rng([seed, _VAL_STREAM]).permutation(n)
    train_idx = _subsample(np.sort(perm[n_val:]), cfg.max_train, seed, _TRAIN_CAP)
    val_idx = _subsample(np.sort(perm[:n_val]), cfg.max_val, seed, _VAL_CAP)
    test_idx = _subsample(np.arange(len(test_y)), cfg.max_test, seed, _TEST_CAP)
    return Splits(
        train=_tensors(train_x, train_y, train_idx),
        val=_tensors(train_x, train_y, val_idx),
        test=_tensors(test_x, test_y, test_idx),
        num_classes=len(names),
        class_names=names,
    )


def _tensors(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx].astype(np.int64))
    )


# --- per-batch transform and loaders -------------------------------------------------------------


class ImageTransform:
    """uint8 (B, C, H, W) -> float32 (B, num_channels, image_size, image_size), normalised.

    Steps: /255; grey->RGB by repeating the channel or RGB->grey by the channel mean; bilinear
    resize with antialiasing (only when the size differs); (x - mean) / std per channel.
    A plain class (not a closure) so that it pickles and Ray can ship it to workers.
    """

    def __init__(self, image_size: int, num_channels: int, mean: Sequence[float], std: Sequence[float]):
        if num_channels not in (1, 3) or len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(
                f"need num_channels 1 or 3 with that many mean/std values, got "
                f"num_channels={num_channels}, mean={list(mean)}, std={list(std)}"
            )
        self.image_size, self.num_channels = image_size, num_channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        channels = x.shape[1]
        if channels == 3 and self.num_channels == 1:
            x = x.mean(dim=1, keepdim=True)  # before resizing: a third of the work
        elif channels != self.num_channels and channels != 1:
            raise ValueError(f"cannot turn {channels}-channel images into {self.num_channels} channels")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        if x.shape[1] != self.num_channels:  # grey -> RGB after resizing: resize one channel only
            x = x.expand(-1, self.num_channels, -1, -1)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, num_channels={self.num_channels}, "
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
        )


class _TransformCollate:
    """Stack (image, label) pairs into a batch and apply the transform to the whole batch at once."""

    def __init__(self, transform: ImageTransform | None):
        self.transform = transform

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(items)
        return (images if self.transform is None else self.transform(images)), labels


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, transform: ImageTransform | None
) -> DataLoader:
    """Batches of (images, labels); shuffling is seeded, the last partial batch is kept.

    ``num_workers=0``: the data are already in memory and Ray gives each trial its own CPUs, so
    worker processes would only add start-up time and oversubscribe the cores.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_TransformCollate(transform),
    )
