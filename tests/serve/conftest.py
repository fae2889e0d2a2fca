"""A trial folder as a trial leaves it (config, adapter with θ₀, glm posterior), from the session's tiny
fine-tuned trial, and the predictor folder built from it."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from distlap import names
from distlap.config import to_yaml
from distlap.finetune.run import ADAPTER_DIR, save_adapter
from distlap.serve.build import Source, build
from distlap.trial import write_posterior
from helpers import study_of

SUBSET = "late"


@pytest.fixture(scope="module")
def trial_folder(fine_tuned, tmp_path_factory) -> SimpleNamespace:
    """``fine_tuned``'s study (glm, diag) and its trial folder; ``.study`` predicts as the trial did."""
    folder = tmp_path_factory.mktemp("trial")
    study = study_of(fine_tuned, only=(SUBSET, "all"))
    (folder / names.CONFIG_FILE).write_text(to_yaml(fine_tuned.cfg))
    save_adapter(fine_tuned, folder / ADAPTER_DIR)
    write_posterior(study, folder)
    return SimpleNamespace(folder=folder, study=study, ft=fine_tuned)


@pytest.fixture(scope="module")
def predictor_folder(trial_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predictor") / "predictor"
    source = Source(
        trial_folder.folder,
        trial_folder.ft.cfg,
        SUBSET,
        tuple(trial_folder.study.subsets[SUBSET]),
        {names.TRIAL_ID: "t0"},
    )
    build(source, folder)
    return folder
