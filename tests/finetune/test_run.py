"""Fine-tuning one config, and restoring it from a checkpoint folder without training."""

import pytest
import torch

from distlap import metrics, names
from distlap.config import load_config
from distlap.finetune.run import fine_tune, restore_fine_tuned, save_fine_tuned
from distlap.runtime import predict
from distlap.trial import map_metrics


def test_restored_checkpoint_is_the_fine_tuned_model(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    cfg = load_config(
        overrides=[
            f"data.path={fake_fmnist_dir}",
            f"backbone.name={tiny_vit_dir}",
            "data.classes=[5,6,7,8,9]",
            "train.epochs=1",
            "train.regime=posthoc",
            "train.batch_size=32",
            "peft.method=hybrid",
        ]
    )
    ft = fine_tune(cfg, log=lambda m: None)
    save_fine_tuned(ft, tmp_path)
    back = restore_fine_tuned(cfg, tmp_path)
    loader = ft.loader("test")
    assert torch.allclose(
        predict(ft.model, loader, ft.device)[0], predict(back.model, loader, back.device)[0]
    )
    assert back.tuned == ft.tuned and back.train.history == ft.train.history
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable(back.model) == trainable(ft.model)  # what Laplace will see
    # peft_methods without Laplace reports the MAP predictive itself and the method's costs
    m = map_metrics(back)
    probs, labels = predict(back.model, back.loader("test"), back.device)
    test = names.scores("map", "test")
    assert m[test["accuracy"]] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    assert m[test["nll"]] == pytest.approx(metrics.negative_log_likelihood(probs, labels))
    assert set(m) == {*names.scores("map", "val").values(), *test.values()}


def test_fit_loader_is_a_seeded_subset_of_train(fake_fmnist_dir, tiny_vit_dir):
    cfg = load_config(
        overrides=[
            f"data.path={fake_fmnist_dir}",
            f"backbone.name={tiny_vit_dir}",
            "data.classes=[5,6,7,8,9]",
            "train.epochs=1",
            "train.regime=posthoc",
        ]
    )
    ft = fine_tune(cfg, log=lambda m: None)
    a, b = (ft.loader("train", max_examples=40) for _ in range(2))
    assert len(a.dataset) == 40 and a.dataset.indices == b.dataset.indices
    assert len(set(a.dataset.indices)) == 40 and max(a.dataset.indices) < len(ft.splits.train)
    assert len(ft.loader("train", max_examples=10**6).dataset) == len(ft.splits.train)
