import json

import pytest
import torch

from distlap import backbones, pretrain
from distlap.backbones import BackboneError, TinyRecipe, load_backbone
from distlap.pretrain import RECIPE_FILE, ensure_tiny_backbone


def test_local_dir_loads_with_fresh_seeded_head(tiny_vit_dir):
    from transformers import ViTForImageClassification

    saved = ViTForImageClassification.from_pretrained(tiny_vit_dir)
    model, transform = load_backbone(str(tiny_vit_dir), num_labels=5, seed=1)
    again, _ = load_backbone(str(tiny_vit_dir), num_labels=5, seed=1)
    other, _ = load_backbone(str(tiny_vit_dir), num_labels=5, seed=2)
    assert model.classifier.out_features == 5 and model.config.num_labels == 5
    # same-size head is still replaced (upstream classes mean nothing downstream), reproducibly
    assert not torch.equal(model.classifier.weight, saved.classifier.weight)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    # the backbone itself is the saved one
    assert torch.equal(model.vit.layers[0].attention.q_proj.weight, saved.vit.layers[0].attention.q_proj.weight)
    # the transform comes from the saved image processor
    assert (transform.image_size, transform.num_channels) == (28, 1)
    assert transform.mean.flatten().tolist() == [0.25] and transform.std.flatten().tolist() == [0.5]


def test_head_size_follows_task(tiny_vit_dir):
    model, _ = load_backbone(str(tiny_vit_dir), num_labels=3)
    assert model(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 3)


def test_offline_hub_gives_one_clear_error(offline_hub, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError, match=r"no-such-org/vit.*save_pretrained.*backbone.name=DIR"):
        load_backbone("no-such-org/vit", num_labels=3)


@pytest.fixture
def micro_recipe(monkeypatch):
    recipe = TinyRecipe(dataset="fashion_mnist", upstream_classes=(0, 1, 2, 3, 4),
                        downstream_classes=(5, 6, 7, 8, 9), hidden_size=16, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=32, epochs=2, batch_size=64, lr=3e-3)
    monkeypatch.setitem(backbones.TINY_BACKBONES, "test/micro", recipe)
    return recipe


def test_tiny_backbone_pretrains_once_then_loads_from_cache(micro_recipe, fake_fmnist_dir, tmp_path, monkeypatch):
    path = ensure_tiny_backbone("test/micro", tmp_path, data_path=str(fake_fmnist_dir), log=lambda m: None)
    summary = json.loads((path / RECIPE_FILE).read_text())
    assert summary["recipe"]["hidden_size"] == 16
    assert summary["upstream_val"]["accuracy"] > 0.5   # learnable fake data, 5 classes: chance is 0.2

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained twice")

    monkeypatch.setattr(pretrain, "pretrain", refuse)
    model, transform = load_backbone("test/micro", num_labels=5, cache_dir=str(tmp_path),
                                     data_path=str(fake_fmnist_dir))
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 3
    assert transform.mean.flatten().tolist() == pytest.approx(pretrain.FMNIST_MEAN)


def test_cache_key_changes_with_recipe(micro_recipe, tmp_path):
    import dataclasses

    a = pretrain.cache_path("test/micro", micro_recipe, tmp_path)
    b = pretrain.cache_path("test/micro", dataclasses.replace(micro_recipe, epochs=3), tmp_path)
    assert a != b and a.parent == b.parent
