import pytest
import torch

from distlap.config import PeftConfig
from distlap.finetune.adapters import apply_peft, query_value_modules, tuned_params


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_query_value_names_of_installed_transformers(tiny_vit):
    assert query_value_modules(tiny_vit) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "method, must, must_not",
    [
        ("lora", ["lora_A", "lora_B", "classifier"], ["layernorm"]),
        ("norm", ["layernorm_before", "layernorm_after", "classifier"], ["lora_"]),
        ("hybrid", ["lora_A", "layernorm_before", "classifier"], []),
    ],
)
def test_methods_train_exactly_their_parameters(tiny_vit, method, must, must_not):
    model = apply_peft(tiny_vit, PeftConfig(method=method, rank=2))
    names = trainable_names(model)
    for part in must:
        assert any(part in n for n in names), (method, part)
    for part in must_not:
        assert not any(part in n for n in names), (method, part)
    # nothing of the frozen backbone (attention / MLP weights themselves, embeddings) is trained
    assert not any(n.endswith(("q_proj.base_layer.weight", "fc1.weight", "projection.weight")) for n in names)


@pytest.mark.parametrize("method", ["lora", "norm", "hybrid"])
def test_tuned_params_match_peft_and_a_manual_count(tiny_vit, method):
    model = apply_peft(tiny_vit, PeftConfig(method=method, rank=4))
    tuned = tuned_params(model)
    assert tuned.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (tuned.trainable, tuned.total) == model.get_nb_trainable_parameters()
    assert tuned.pct == pytest.approx(100 * tuned.trainable / tuned.total)


def test_lora_count_by_hand(tiny_vit):
    # 4 blocks x {q, v} x (A: r x 32 + B: 32 x r) + head 32 x 5 + 5, with r = 4
    tuned = tuned_params(apply_peft(tiny_vit, PeftConfig(method="lora", rank=4)))
    assert tuned.trainable == 4 * 2 * (4 * 32 + 32 * 4) + 32 * 5 + 5


def test_unknown_target_module(tiny_vit):
    with pytest.raises(ValueError, match=r"no module named \['query'\]"):
        apply_peft(tiny_vit, PeftConfig(target_modules=["q_proj", "query"]))


def test_adapter_round_trip(tiny_vit, tmp_path):
    from peft import PeftModel

    from helpers import make_tiny_vit

    model = apply_peft(tiny_vit, PeftConfig(method="hybrid", rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)  # LoRA B starts at zero: move off the initialisation
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 1, 28, 28)
    reloaded = PeftModel.from_pretrained(make_tiny_vit(), tmp_path)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(model(pixel_values=x).logits, reloaded(pixel_values=x).logits)
