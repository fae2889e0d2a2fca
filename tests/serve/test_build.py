"""The predictor folder written from a trial's files: its layout, its spec, only the subset's posterior."""

import json

from distlap.bayes import glm_posterior
from distlap.serve.bundle import (
    ADAPTER_DIR,
    BACKBONE_DIR,
    CHECKSUMS_FILE,
    POSTERIOR_FILE,
    SPEC_FILE,
    Spec,
    verify,
)


def test_the_folder_holds_backbone_adapter_prior_mean_posterior_and_spec(predictor_folder, trial_folder):
    files = {p.relative_to(predictor_folder).as_posix() for p in predictor_folder.rglob("*") if p.is_file()}
    assert {f"{BACKBONE_DIR}/config.json", f"{BACKBONE_DIR}/model.safetensors"} <= files
    assert {f"{ADAPTER_DIR}/adapter_model.safetensors", f"{ADAPTER_DIR}/prior_mean.safetensors"} <= files
    assert {POSTERIOR_FILE, SPEC_FILE, CHECKSUMS_FILE} <= files
    assert set(json.loads((predictor_folder / CHECKSUMS_FILE).read_text())) == files - {CHECKSUMS_FILE}
    verify(predictor_folder)
    spec = Spec.read(predictor_folder)
    ft = trial_folder.ft
    assert spec.subset == "late" and spec.blocks == [3] and spec.predictive == "glm" and spec.link == "probit"
    assert spec.prior_precision == trial_folder.study.result["laplace/prior_precision"]
    assert spec.input_shape == [28, 28, 1] and spec.classes == ft.splits.class_names
    assert spec.transform.mean == ft.transform.mean.flatten().tolist()
    assert spec.backbone == ft.cfg.backbone.name


def test_only_the_subsets_posterior_is_kept(predictor_folder):
    posterior = glm_posterior.load(predictor_folder / POSTERIOR_FILE)
    assert set(posterior.blocks) == {3} and posterior.names
    assert all(".3." in name for name in posterior.names)
