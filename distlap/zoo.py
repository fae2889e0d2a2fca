"""The registry of data sets and of distlap's own tiny backbones: names, where they live, what they hold.

Plain data, so that the config can derive defaults from it (a tiny backbone's downstream classes)
without importing the code that loads or pretrains anything.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- data sets ------------------------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # pixel statistics of the train split
CIFAR_HUB_IDS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}


# --- distlap's own tiny backbones -----------------------------------------------------------------


@dataclass(frozen=True)
class TinyRecipe:
    """How one of distlap's own tiny ViTs is built and pretrained (the cache key hashes all of it)."""

    dataset: str
    upstream_classes: tuple[int, ...]
    downstream_classes: tuple[int, ...]
    image_size: int = 28
    num_channels: int = 1
    patch_size: int = 7
    hidden_size: int = 64
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 128
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0


_FMNIST = dict(dataset="fashion_mnist", upstream_classes=(0, 1, 2, 3, 4), downstream_classes=(5, 6, 7, 8, 9))
TINY_BACKBONES: dict[str, TinyRecipe] = {
    # 6 blocks so that early / mid / late thirds hold two blocks each.
    "distlap/vit-tiny-fmnist": TinyRecipe(**_FMNIST),
    # Narrower and shallower: the second backbone of the PEFT-methods comparison.
    "distlap/vit-mini-fmnist": TinyRecipe(
        **_FMNIST, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    ),
}
