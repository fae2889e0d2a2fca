"""An exported predictor in MLflow: the pyfunc model folder and its version in the sweep's model registry.

The folder is saved with ``loader_module`` (:mod:`distlap.serve.predictor`) and ``data_path`` (the
predictor folder, :mod:`distlap.serve.bundle`), never with a ``python_model`` object, which MLflow would
pickle with cloudpickle; the pip requirements are given, so MLflow does not load the model to infer them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LOADER = "distlap.serve.predictor"
# what the loader imports, pinned to this environment's versions
REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "laplace-torch", "numpy")


@dataclass(frozen=True)
class Registration:
    """A model version: the registry at ``uri`` (the sweep's tracking store), the registered model's
    ``name``, and the version's description and tags."""

    uri: str
    name: str
    description: str
    tags: dict[str, str] = field(default_factory=dict)


def requirements() -> list[str]:
    """``package==version`` of what the loader imports, and distlap itself."""
    import distlap

    pinned = []
    for package in REQUIREMENTS:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pinned.append(package)
    return [*pinned, f"distlap=={distlap.__version__}"]


def data_folder(path: Path, data_name: str) -> Path:
    """Where :func:`save_pyfunc` copies a data folder named ``data_name`` inside the model folder ``path``
    (MLflow's ``data/<name>``, the folder its loader module is given)."""
    return path / "data" / data_name


def save_pyfunc(data: Path, path: Path) -> None:
    """The MLflow pyfunc model folder ``path`` whose data is the predictor folder ``data``, copied to
    :func:`data_folder`."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        str(path), loader_module=LOADER, data_path=str(data), pip_requirements=requirements()
    )


def register(path: Path, reg: Registration) -> str:
    """A new version of ``reg.name`` (created when absent) whose source is the model folder ``path``;
    returns the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=reg.uri, registry_uri=reg.uri)
    try:
        client.get_registered_model(reg.name)
    except MlflowException:
        client.create_registered_model(reg.name, description="distlap predictors exported from this sweep")
    found = client.create_model_version(
        reg.name, source=str(path.resolve()), tags=reg.tags, description=reg.description
    )
    return str(found.version)
