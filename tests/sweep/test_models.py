"""An exported predictor in MLflow: a pyfunc folder saved through its loader module (nothing pickled) and
versions in a registry."""

import yaml
from mlflow import MlflowClient

from distlap.sweep.models import LOADER, Registration, data_folder, register, requirements, save_pyfunc


def test_the_pyfunc_folder_names_the_loader_module_and_pins_requirements(tmp_path):
    data = tmp_path / "predictor"
    data.mkdir()
    (data / "predictor.json").write_text("{}")
    save_pyfunc(data, tmp_path / "model")
    flavor = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == LOADER and "python_model" not in flavor
    assert (data_folder(tmp_path / "model", "predictor") / "predictor.json").is_file()
    assert not list((tmp_path / "model").rglob("*.pkl"))
    pinned = (tmp_path / "model" / "requirements.txt").read_text()
    assert all(line in pinned for line in requirements()) and "distlap==" in pinned


def test_each_export_is_a_new_version_with_its_description_and_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "m1").mkdir()
    reg = Registration(uri, "distlap-x", "Δ_ECE +0.01 [-0.01, +0.03]; cost 1 s", {"subset": "late"})
    assert register(tmp_path / "m1", reg) == "1"
    assert register(tmp_path / "m1", reg) == "2"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("distlap-x", "2")
    assert version.description == reg.description and version.tags["subset"] == "late"
    assert version.source == str(tmp_path / "m1")
