import dataclasses
import json

import pytest

from distlap import zoo
from distlap.finetune import pretrain
from distlap.finetune.backbones import load_backbone
from distlap.finetune.pretrain import RECIPE_FILE, ensure_tiny_backbone, resolve
from distlap.zoo import TinyRecipe


@pytest.fixture
def micro_recipe(monkeypatch):
    recipe = TinyRecipe(
        dataset="fashion_mnist",
        upstream_classes=(0, 1, 2, 3, 4),
        downstream_classes=(5, 6, 7, 8, 9),
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        epochs=2,
        batch_size=64,
        lr=3e-3,
    )
    monkeypatch.setitem(zoo.TINY_BACKBONES, "test/micro", recipe)
    return recipe


def test_tiny_backbone_pretrains_once_then_loads_from_cache(
    micro_recipe, fake_fmnist_dir, tmp_path, monkeypatch
):
    path = ensure_tiny_backbone("test/micro", tmp_path, data_path=str(fake_fmnist_dir), log=lambda m: None)
    summary = json.loads((path / RECIPE_FILE).read_text())
    assert summary["recipe"]["hidden_size"] == 16
    assert summary["upstream_val"]["accuracy"] > 0.5  # learnable fake data, 5 classes: chance is 0.2

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained twice")

    monkeypatch.setattr(pretrain, "pretrain", refuse)
    model, transform = load_backbone(
        "test/micro", num_labels=5, cache_dir=str(tmp_path), data_path=str(fake_fmnist_dir)
    )
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 3
    assert transform.mean.flatten().tolist() == pytest.approx(zoo.FASHION_MNIST_MEAN)


def test_cache_key_changes_with_recipe(micro_recipe, tmp_path):
    a = pretrain.cache_path("test/micro", micro_recipe, tmp_path)
    b = pretrain.cache_path("test/micro", dataclasses.replace(micro_recipe, epochs=3), tmp_path)
    assert a != b and a.parent == b.parent


def test_shipped_backbones_match_their_recipes():
    """The assets in the package are found without pretraining (a fresh clone waits for nothing)."""
    for name, recipe in zoo.TINY_BACKBONES.items():
        shipped = pretrain.cache_path(name, recipe, pretrain.ASSETS_DIR)
        assert (shipped / RECIPE_FILE).is_file(), f"{name}: no shipped backbone at {shipped}"
        assert resolve(name) == str(shipped)


def test_other_names_pass_through():
    assert resolve("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
