import pytest
import torch

from distlap.finetune.backbones import BackboneError, load_backbone


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
    assert torch.equal(
        model.vit.layers[0].attention.q_proj.weight, saved.vit.layers[0].attention.q_proj.weight
    )
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


def test_corrupt_local_weights_name_the_file_and_the_fix(tiny_vit_dir, tmp_path):
    """A truncated safetensors file (safetensors raises its own error type) is one BackboneError that
    names the file; so is a directory without weights (it is not called 'not a local directory')."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_vit_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BackboneError, match=rf"{weights} is corrupt or truncated.*save_pretrained"):
        load_backbone(str(broken), num_labels=3)
    weights.unlink()
    with pytest.raises(BackboneError, match=rf"{broken} holds no model weights"):
        load_backbone(str(broken), num_labels=3)
