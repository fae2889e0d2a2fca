"""``python -m distlap.export`` on a copy of the session's smoke sweep (tests/conftest.py): the report's
selection exported, registered and loaded by MLflow in a fresh process, equal to the trial's own
predictive; and every bad input refused with one line before anything is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from distlap import names
from distlap.config import load_config
from distlap.export import Request, export, main
from distlap.finetune.run import ADAPTER_DIR, prepare
from distlap.serve.bundle import SPEC_FILE
from distlap.sweep.settings import load_sweep_config
from distlap.trial import layerwise
from helpers import ROOT

pytestmark = pytest.mark.slow
DATA = Path("data") / "predictor"  # the predictor folder inside the MLflow model folder
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".cloudpickle"}


def copy_sweep(src: Path, dst: Path) -> Path:
    """The sweep with its own stores, its config pointing at the copy (exporting registers a model)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ray_results", "mlartifacts", "plots"))
    config = dst / names.CONFIG_FILE
    config.write_text(config.read_text().replace(str(src), str(dst)))
    return dst


@pytest.fixture(scope="module")
def exported(smoke_sweep, tmp_path_factory):
    """The default export (the report's selection) of a copy of the smoke sweep."""
    root = tmp_path_factory.mktemp("export")
    sweep = copy_sweep(smoke_sweep.out, root / "sweep")
    out = root / "model"
    lines = []
    export(Request(sweep, out), log=lines.append)
    spec = json.loads((out / DATA / SPEC_FILE).read_text())
    return SimpleNamespace(sweep=sweep, out=out, lines=lines, spec=spec, root=root)


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def test_the_default_is_the_reports_selection_registered_with_its_lead_row(exported):
    summary = json.loads((exported.sweep / "report" / "analysis_summary.json").read_text())
    chosen = summary["selected"]
    assert exported.spec["subset"] == chosen[names.SUBSET]
    assert exported.spec["origin"][names.TRIAL_ID] == chosen[names.TRIAL_ID]
    assert chosen[names.TRIAL_ID] in summary["reference_config"][names.TRIAL_IDS]
    uri = load_sweep_config(exported.sweep / names.CONFIG_FILE).tracking.uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions(f"name='distlap-{exported.sweep.name}'")
    assert Path(version.source) == exported.out
    delta = names.split_delta("test", "ece")
    assert float(version.tags[delta]) == pytest.approx(chosen["lead_row"][delta])
    assert {delta + "_low", delta + "_high", "cost_s", names.SUBSET} <= set(version.tags)
    assert "Δ_ECE" in version.description and "cost" in version.description
    assert any(
        f"mlflow.pyfunc.load_model('{exported.out}').predict(images)" in line for line in exported.lines
    )


def test_nothing_in_the_model_folder_is_a_pickle(exported):
    files = [p for p in exported.out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        head = path.read_bytes()[:2]
        assert path.suffix not in PICKLE_SUFFIXES, path
        assert not (head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5), f"{path} is a pickle"
        assert head != b"PK", f"{path} is a zip (torch.save)"


PREDICT = """
import sys, numpy as np, mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
loaded = sorted(m for m in ("ray", "optuna", "optuna_integration") if m in sys.modules)
assert not loaded, f"loading and predicting imported {loaded}"
"""


def test_predict_equals_the_trials_own_predictive_in_a_fresh_offline_process(exported, tmp_path):
    trial = exported.sweep / names.TRIALS_DIR / exported.spec["origin"][names.TRIAL_ID]
    subset, blocks = exported.spec["subset"], exported.spec["blocks"]
    cfg = load_config(trial / names.CONFIG_FILE)
    ft = prepare(cfg, adapter=trial / ADAPTER_DIR, log=lambda m: None)
    study = layerwise(ft, only=[subset], log=lambda m: None)  # the trial's own code, refitted
    recorded = json.loads((trial / names.LAYERWISE_FILE).read_text())["subsets"][subset]["metrics"]
    nll = names.score("subset", "test", "nll")
    assert study.result["subsets"][subset]["metrics"][nll] == pytest.approx(recorded[nll], rel=1e-6, abs=1e-9)
    own = study.predictive(ft.loader("test"), {subset: blocks}).subsets[subset].numpy()
    images = ft.splits.test.tensors[0][:, 0].numpy()  # (N, 28, 28) uint8, as Fashion-MNIST gives them
    np.save(tmp_path / "x.npy", images)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    env |= {"HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path)}
    args = [
        sys.executable,
        "-c",
        PREDICT,
        str(exported.out),
        str(tmp_path / "x.npy"),
        str(tmp_path / "p.npy"),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probs = np.load(tmp_path / "p.npy")
    gap = float(np.abs(probs - own).max())
    print(f"max |Δprob| exported vs the trial's predictive, {len(images)} test images: {gap:.2e}")
    assert probs.shape == own.shape and gap <= 1e-6


def test_not_a_sweep_folder_is_refused(capsys, tmp_path):
    rc, err = run_cli(capsys, tmp_path, "--output", tmp_path / "model")
    assert rc == 2 and len(err.splitlines()) == 1 and "is not a sweep folder" in err
    assert not (tmp_path / "model").exists()


def test_a_trial_without_results_is_refused(capsys, exported):
    unfinished = exported.sweep / names.TRIALS_DIR / "unfinished"
    unfinished.mkdir()
    (unfinished / names.CONFIG_FILE).write_text("seed: 0\n")
    out = exported.root / "refused-trial"
    rc, err = run_cli(capsys, exported.sweep, "--output", out, "--trial", "unfinished")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "trial unfinished has no results to export" in err and "--trial" in err
    assert not out.exists()


def test_a_trial_from_before_the_posterior_was_saved_is_refused(capsys, exported):
    trial = exported.sweep / names.TRIALS_DIR / exported.spec["origin"][names.TRIAL_ID]
    old = Path(shutil.copytree(trial, exported.sweep / names.TRIALS_DIR / "older"))
    (old / names.POSTERIOR_FILE).unlink()
    out = exported.root / "refused-older"
    rc, err = run_cli(capsys, exported.sweep, "--output", out, "--trial", "older")
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"trial older has no {names.POSTERIOR_FILE}" in err and not out.exists()


def test_an_unknown_subset_is_refused(capsys, exported):
    out = exported.root / "refused-subset"
    rc, err = run_cli(capsys, exported.sweep, "--output", out, "--subset", "layer_99")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no subset 'layer_99'" in err and "layer_0" in err and "all" in err
    assert not out.exists() and not list(exported.root.glob(".refused-subset-*"))


@pytest.fixture
def model_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported.out, tmp_path / "model"))


def _load(path: Path):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(path))


def test_a_missing_file_in_the_model_folder_is_refused(model_copy):
    (model_copy / DATA / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter/adapter_model.safetensors is missing") as err:
        _load(model_copy)
    assert "\n" not in str(err.value)


def test_an_altered_file_in_the_model_folder_is_refused(model_copy):
    path = model_copy / DATA / "posterior.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="posterior.safetensors was altered") as err:
        _load(model_copy)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "images",
    [np.zeros((2, 32, 32), np.uint8), np.zeros((2, 28, 28, 3), np.uint8), np.zeros((2, 28, 28), np.float32)],
    ids=["size", "channels", "dtype"],
)
def test_images_of_the_wrong_shape_are_refused(exported, images):
    with pytest.raises(ValueError, match=r"this model takes uint8 arrays of shape \(B, 28, 28\)") as err:
        _load(exported.out).predict(images)
    assert "\n" not in str(err.value) and str(images.shape) in str(err.value)


def test_the_predictor_takes_a_batch_of_raw_images(exported):
    probs = _load(exported.out).predict(np.full((3, 28, 28), 255, np.uint8))
    assert probs.shape == (3, len(exported.spec["classes"])) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert torch.from_numpy(probs).isfinite().all()
