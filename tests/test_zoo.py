import os

import numpy as np
import pytest

from distlap import zoo
from distlap.bayes.layers import standard_subsets
from distlap.config import load_config


@pytest.mark.parametrize("name", sorted(zoo.TINY_BACKBONES))
def test_tiny_backbones_pretrain_and_fine_tune_on_disjoint_classes(name):
    recipe = zoo.TINY_BACKBONES[name]
    up, down = set(recipe.upstream_classes), set(recipe.downstream_classes)
    assert not up & down and up | down <= set(range(len(zoo.FASHION_MNIST_CLASSES)))
    assert recipe.hidden_size % recipe.num_attention_heads == 0
    assert recipe.image_size % recipe.patch_size == 0
    standard_subsets(recipe.num_hidden_layers)  # early / mid / late need at least 3 blocks


def test_the_default_backbone_gives_two_blocks_per_third():
    recipe = zoo.TINY_BACKBONES[load_config().backbone.name]
    thirds = standard_subsets(recipe.num_hidden_layers)
    assert [len(thirds[g]) for g in ("early", "mid", "late")] == [2, 2, 2]


def test_the_config_fine_tunes_a_tiny_backbone_on_its_downstream_classes():
    for name, recipe in zoo.TINY_BACKBONES.items():
        assert load_config(overrides=[f"backbone.name={name}"]).data.classes == list(
            recipe.downstream_classes
        )


@pytest.mark.skipif(not os.path.isdir(zoo.FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_statistics_are_those_of_its_train_split():
    from distlap.finetune.data import read_idx

    pixels = read_idx(os.path.join(zoo.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")) / 255.0
    assert np.mean(pixels) == pytest.approx(zoo.FASHION_MNIST_MEAN[0], abs=1e-4)
    assert np.std(pixels) == pytest.approx(zoo.FASHION_MNIST_STD[0], abs=1e-4)
