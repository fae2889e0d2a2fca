import pytest

from distlap.bayes.layers import block_index, layer_subsets, num_blocks, standard_subsets


@pytest.mark.parametrize(
    "name, index",
    [
        ("vit.layers.3.attention.q_proj.weight", 3),  # transformers 5.x
        ("vit.encoder.layer.11.attention.attention.query.weight", 11),  # transformers 4.x
        ("base_model.model.vit.layers.0.attention.q_proj.lora_A.default.weight", 0),  # peft-wrapped
        ("base_model.model.vit.encoder.layer.7.output.dense.lora_B.default.weight", 7),
        ("base_model.model.vit.layers.10.layernorm_before.ln_tuning_layers.default.bias", 10),
        ("vit.embeddings.patch_embeddings.projection.weight", None),
        ("base_model.model.classifier.modules_to_save.default.weight", None),
        ("vit.layernorm.weight", None),
    ],
)
def test_block_index_across_naming_schemes(name, index):
    assert block_index(name) == index


def test_num_blocks_of_a_real_vit(tiny_vit):
    assert num_blocks(tiny_vit) == tiny_vit.config.num_hidden_layers


def test_standard_subsets():
    s = standard_subsets(12)
    assert list(s)[:12] == [f"layer_{i}" for i in range(12)]
    assert (s["early"], s["mid"], s["late"]) == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))
    assert s["all"] == tuple(range(12))
    s4 = standard_subsets(4)
    assert (s4["early"], s4["mid"], s4["late"]) == ((0, 1), (2,), (3,))
    with pytest.raises(ValueError, match="at least 3 blocks"):
        standard_subsets(2)


def test_layer_subsets_with_the_users_named_ones():
    s = layer_subsets(4, {"ends": [0, 3]})
    assert list(s) == ["layer_0", "layer_1", "layer_2", "layer_3", "early", "mid", "late", "all", "ends"]
    for bad in ({"x": [4]}, {"x": []}, {"all": [0]}):
        with pytest.raises(ValueError, match=r"laplace\.subsets\..*0\.\.3"):
            layer_subsets(4, bad)
