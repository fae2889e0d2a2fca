"""θ₀: read from the fresh adapter (A at its seeded initialisation, or 0), saved beside the adapter and
restored bit for bit; the training penalty, laplace-torch's prior mean and the evidence all read it."""

import pytest
import torch

from distlap.config import PeftConfig, load_config
from distlap.finetune.adapters import apply_peft
from distlap.finetune.anchor import PRIOR_MEAN_FILE, load_prior_mean, prior_mean, save_prior_mean
from distlap.finetune.run import fine_tune, restore_fine_tuned, save_fine_tuned
from distlap.finetune.train import LogitsModel
from helpers import make_tiny_vit, tiny_trial


def _fresh(method="lora", rank=2, seed=0):
    torch.manual_seed(seed)
    return LogitsModel(apply_peft(make_tiny_vit(), PeftConfig(method=method, rank=rank)))


def test_init_anchor_is_a_at_its_initialisation_and_zero_elsewhere():
    model = _fresh()
    means = prior_mean(model, "init")
    tuned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(means) == set(tuned)
    a = [n for n in means if "lora_A" in n]
    b = [n for n in means if "lora_B" in n]
    head = [n for n in means if "classifier" in n]
    assert len(a) == len(b) == 2 * 4 and head  # q and v in 4 blocks
    for n in a:  # A's own seeded initialisation (peft's Kaiming draw): non-zero, a copy, not a view
        assert torch.equal(means[n], tuned[n]) and means[n].abs().sum() > 0
        assert means[n].data_ptr() != tuned[n].data_ptr()
    assert all(means[n].abs().sum() == 0 for n in b + head)
    # the same seed gives the same A0 (it is the adapter's seeded initialisation, nothing else)
    again = prior_mean(_fresh(), "init")
    assert all(torch.equal(again[n], means[n]) for n in means)


def test_zero_anchor_puts_both_factors_at_zero():
    means = prior_mean(_fresh(), "zero")
    assert all(m.abs().sum() == 0 for n, m in means.items() if "lora_" in n)


def test_layernorms_are_anchored_at_their_pretrained_values():
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    pretrained = {n: p.detach().clone() for n, p in backbone.named_parameters() if "layernorm" in n}
    with torch.no_grad():  # a pretrained LayerNorm is not the default (1, 0): make it visible
        for n, p in backbone.named_parameters():
            if "layernorm" in n:
                p.add_(torch.randn_like(p))
                pretrained[n] = p.detach().clone()
    model = LogitsModel(apply_peft(backbone, PeftConfig(method="hybrid", rank=2)))
    means = prior_mean(model)
    norms = {n: m for n, m in means.items() if "layernorm" in n}
    assert len(norms) == len(pretrained)
    for n, m in norms.items():  # model.base_model.model.vit.<...>.layernorm_before.modules_to_save...
        key = n.split("base_model.model.", 1)[1].replace(".modules_to_save.default", "")
        assert torch.equal(m, pretrained[key]), n


def test_unknown_anchor_is_refused():
    with pytest.raises(ValueError, match=r"train.prior_anchor='origin' is not one of init, zero"):
        prior_mean(_fresh(), "origin")


def test_saved_prior_mean_round_trips_bit_for_bit_and_is_not_the_trained_a(tmp_path):
    model = _fresh()
    means = prior_mean(model)
    save_prior_mean(means, tmp_path)
    with torch.no_grad():  # training moves A: a re-derived theta0 would now be the trained A
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    back = load_prior_mean(tmp_path, model)
    assert set(back) == set(means) and all(torch.equal(back[n], means[n]) for n in means)
    a = next(n for n in means if "lora_A" in n)
    assert not torch.equal(back[a], dict(model.named_parameters())[a])


def test_a_prior_mean_file_that_does_not_match_is_refused(tmp_path):
    save_prior_mean(prior_mean(_fresh(rank=2)), tmp_path)
    with pytest.raises(ValueError, match=r"does not match the adapter's tuned parameters.*other shape"):
        load_prior_mean(tmp_path, _fresh(rank=4))
    with pytest.raises(ValueError, match=r"does not match.*missing.*unexpected"):
        load_prior_mean(tmp_path, _fresh(method="norm"))
    (tmp_path / PRIOR_MEAN_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_prior_mean(tmp_path, _fresh(rank=2))
    with pytest.raises(ValueError, match=r"prior_mean.safetensors is missing.*cannot be re-derived"):
        load_prior_mean(tmp_path / "elsewhere", _fresh())


def test_a_restored_trial_keeps_its_theta0_and_everything_reads_it(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    """fine-tune -> save -> restore: θ₀ bit for bit; the penalty, laplace-torch's prior_mean and the
    evidence's ‖θ* − θ₀‖² all use it (checked against naive sums over the saved file)."""
    from safetensors.torch import load_file

    from distlap.bayes.glm import param_blocks
    from distlap.bayes.posterior import fit_laplace, posterior_parameters
    from distlap.bayes.prior import block_evidence

    cfg = load_config(overrides=[*tiny_trial(fake_fmnist_dir, tiny_vit_dir), "train.prior_precision=20"])
    ft = fine_tune(cfg, log=lambda m: None)
    save_fine_tuned(ft, tmp_path)
    back = restore_fine_tuned(cfg, tmp_path, log=lambda m: None)
    saved = load_file(str(tmp_path / "adapter" / PRIOR_MEAN_FILE))
    assert all(torch.equal(back.prior.means[n], saved[n]) for n in saved)
    assert all(torch.equal(ft.prior.means[n], saved[n]) for n in saved)
    named = dict(back.model.named_parameters())
    naive = sum(((named[n].detach() - saved[n]) ** 2).sum() for n in saved)
    lam, n_train = cfg.train.prior_precision, len(back.splits.train)
    assert back.prior.penalty(back.model).item() == pytest.approx(
        (lam / (2 * n_train) * naive).item(), rel=1e-6
    )
    names_ = posterior_parameters(back.model, "lora", True)
    fit = back.loader("train", batch_size=32, max_examples=32)
    la = fit_laplace(back.model, names_, fit, cfg.laplace, lam, n_train, back.prior.means)
    torch.testing.assert_close(
        la.prior_mean, torch.cat([saved[n].reshape(-1) for n in names_]), rtol=0, atol=0
    )
    evidence = block_evidence(la, param_blocks(back.model, la))
    from distlap.bayes.layers import block_index

    for b in range(len(evidence.sq_norms)):
        expected = sum(((named[n].detach() - saved[n]) ** 2).sum() for n in names_ if block_index(n) == b)
        assert evidence.sq_norms[b].item() == pytest.approx(float(expected), rel=1e-6)
