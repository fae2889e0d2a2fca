"""A study's GLM posterior saved as tensors gives the study's own probit predictive again, per subset."""

import pytest
import torch

from distlap.bayes import glm_posterior
from distlap.bayes.layers import num_blocks
from helpers import study_of


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_saved_posterior_reproduces_the_studys_predictive(fine_tuned, structure, tmp_path):
    la = fine_tuned.cfg.laplace.model_copy(update={"hessian_structure": structure, "include_norms": False})
    study = study_of(fine_tuned, la, only=("layer_1", "late", "all"))
    path = glm_posterior.save(
        glm_posterior.from_predictive(study.predictive, num_blocks(fine_tuned.model)), tmp_path / "p.st"
    )
    loaded = glm_posterior.load(path)
    assert loaded.prior_precision == study.result["laplace/prior_precision"]
    loader = fine_tuned.loader("test", batch_size=37)  # not the study's batches
    own = study.predictive(loader, study.subsets)
    x = torch.cat([xb for xb, _ in loader])
    for name, blocks in study.subsets.items():
        restricted = loaded.restrict(blocks)
        assert set(restricted.blocks) == set(blocks)
        probs = restricted.probs(fine_tuned.model, x, blocks)
        torch.testing.assert_close(probs, own.subsets[name], rtol=0, atol=1e-6)


def test_a_file_that_is_not_a_posterior_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a distlap GLM posterior"):
        glm_posterior.load(bad)
