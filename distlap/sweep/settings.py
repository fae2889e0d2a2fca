"""Validated settings of a sweep: the base trial, the search (:mod:`distlap.sweep.space`), resources,
tracking.

A :class:`SweepConfig` embeds the :class:`~distlap.config.TrialConfig` every trial starts from; the
searched settings (``search.space``, dotted trial paths such as ``train.prior_precision``, plus the
special ``setting``, which picks one of the named bundles in ``settings``) are overridden per trial.
``kind`` says what a trial does after fine-tuning: ``layerwise`` (Laplace over every layer subset) or
``peft_methods`` (the MAP metrics, and optionally the Laplace predictive of all tuned parameters).
``search.sampler`` is Optuna's TPE or a full grid. Everything is checked here, before Ray starts:
unknown keys, bad values, search ranges whose ends are not valid trial settings, an objective that is
not on the validation split, resources that cannot hold one trial.
"""

from __future__ import annotations

import math
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distlap.config import ConfigError, TrialConfig, _Strict, build, deep_merge, parse_overrides, read_yaml
from distlap.names import SETTING
from distlap.sweep.space import SearchConfig
from distlap.zoo import TINY_BACKBONES


class ResourcesConfig(_Strict):
    """One trial = a placement group: its own bundle plus one child bundle per concurrent subset task."""

    cpus_per_trial: float = Field(1, gt=0, description="CPUs of the trial's own bundle (torch threads).")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs of the trial's own bundle (fine-tuning, fit).")
    eval_tasks: int = Field(
        0,
        ge=0,
        description="Child bundles per trial, and parallel Ray tasks inside them: nn, one subset per "
        "task; glm, each Jacobian pass cut into this many contiguous shards of the examples, one per "
        "task. 0 = evaluate in the trial process.",
    )
    cpus_per_eval_task: float = Field(1, ge=0, description="CPUs of each child bundle / evaluation task.")
    gpus_per_eval_task: float = Field(0, ge=0, le=1, description="Fraction of a GPU per evaluation task.")
    max_concurrent: int | None = Field(
        None, gt=0, description="Trials at once; None = as many placement groups as the cluster holds."
    )
    checkpoint_every_s: float = Field(
        30.0,
        ge=0,
        description="Mid-training checkpoints (and the epochs' curves in MLflow) when an epoch ends at "
        "least this many seconds after the last one; 0 = after every epoch. A retried or preempted trial "
        "repeats at most this much training.",
    )

    @model_validator(mode="after")
    def _child_bundles_not_empty(self) -> ResourcesConfig:
        if self.eval_tasks and not (self.cpus_per_eval_task or self.gpus_per_eval_task):
            raise ValueError("eval_tasks > 0 needs cpus_per_eval_task or gpus_per_eval_task > 0")
        return self

    def bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles: the trial's own first, then its child bundles."""

        def bundle(cpus: float, gpus: float) -> dict[str, float]:
            return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}

        child = [bundle(self.cpus_per_eval_task, self.gpus_per_eval_task)] * self.eval_tasks
        return [bundle(self.cpus_per_trial, self.gpus_per_trial), *child]

    def task_resources(self) -> dict[str, float]:
        """Ray options of one subset task: exactly one child bundle, so k tasks fill k bundles."""
        return {"num_cpus": self.cpus_per_eval_task, "num_gpus": self.gpus_per_eval_task}

    def per_trial(self) -> dict[str, float]:
        total = {"CPU": 0.0, "GPU": 0.0}
        for b in self.bundles():
            for key, value in b.items():
                total[key] += value
        return total


class TrackingConfig(_Strict):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None = sqlite:///<output_dir>/mlflow.db. On a cluster a "
        "database every node reaches (postgresql+psycopg://USER@HOST/DB; the password in PGPASSFILE), "
        "or an http:// tracking server.",
    )
    experiment: str = Field("distlap-layerwise", description="MLflow experiment holding the sweep runs.")
    artifacts: str | None = Field(
        None,
        description="Folder of MLflow's artifacts (plots, summary.csv) when `uri` is a database (sqlite, "
        "postgresql); fixed when the experiment is made. None = <output_dir>/mlartifacts; on a cluster a "
        "folder every node sees. An http:// tracking server keeps its own.",
    )


class SweepConfig(_Strict):
    """A sweep. ``trial`` is the base trial; ``search.space`` names what varies."""

    kind: Literal["layerwise", "peft_methods"] = Field(
        "layerwise",
        description="What a trial does after fine-tuning. layerwise: one Laplace fit and "
        "every layer subset evaluated; peft_methods: the MAP metrics of the PEFT method (and with "
        "`laplace`, the Laplace predictive over all its tuned block parameters).",
    )
    laplace: bool = Field(
        False,
        description="peft_methods only: also fit Laplace over the method's tuned parameters "
        "(trial.laplace settings; LayerNorm parameters need diag) and report bayes/* metrics.",
    )
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named bundles of trial settings (nested, as under `trial`), "
        "e.g. {vit_tiny_cifar10: {backbone: {name: ...}, data: {dataset: cifar10}, train: {epochs: 1}}}; "
        "the search key `setting` (a choice of these names) applies one per trial.",
    )
    name: str = Field("layerwise", description="Sweep name: Ray experiment and MLflow parent run name.")
    output_dir: str | None = Field(
        None,
        description="Folder holding config.yaml, mlflow.db, optuna.db, ray_results/, trials/, "
        "summary.csv; None = runs/<name>-<timestamp>. Shared storage on a multi-node cluster.",
    )
    address: str | None = Field(None, description="Ray cluster (ray://host:10001 or auto); None = local Ray.")
    max_failures: int = Field(
        0,
        ge=0,
        description="Retries of a failed trial (Ray FailureConfig); a "
        "retried trial resumes from its fine-tuning checkpoint.",
    )
    trial: TrialConfig = TrialConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _named_after_kind(cls, raw: Any) -> Any:
        """Unless given: sweep name = kind, MLflow experiment = distlap-<kind> (distlap-peft-methods)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("tracking", {}), dict):
            return raw
        kind = raw.get("kind", "layerwise")
        tracking = {"experiment": f"distlap-{str(kind).replace('_', '-')}", **(raw.get("tracking") or {})}
        return {"name": kind, **raw, "tracking": tracking}

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"{v!r}: use letters, digits, '-', '_' or '.'")
        return v

    @property
    def out(self) -> Path:
        if self.output_dir is None:
            raise ValueError("output_dir is unresolved; call distlap.sweep.settings.resolve first")
        return Path(self.output_dir)


# --- loading -------------------------------------------------------------------------------------


def trial_config(cfg: SweepConfig, params: dict[str, Any], **extra: Any) -> TrialConfig:
    """The base trial, then the named ``setting`` bundle if searched, then the other searched ``params``
    ({"peft.rank": 4, ...}), then top-level ``extra``."""
    params = dict(params)
    update = deep_merge(cfg.settings[params.pop(SETTING)] if SETTING in params else {}, _nest(params))
    return build(TrialConfig, {**_rebased(cfg.trial, update), **extra})


def _rebased(base: TrialConfig, update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in. Classes the base got from its tiny backbone's recipe (its
    downstream classes) are derived afresh when the update names another backbone or data set."""
    raw = deep_merge(base.model_dump(), update)
    recipe = TINY_BACKBONES.get(base.backbone.name)
    moved = (raw["backbone"]["name"], raw["data"]["dataset"]) != (base.backbone.name, base.data.dataset)
    derived = recipe is not None and base.data.classes == list(recipe.downstream_classes)
    if moved and derived and "classes" not in update.get("data", {}):
        raw["data"]["classes"] = None
    return raw


def _nest(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def check(cfg: SweepConfig) -> SweepConfig:
    """Cross-field checks pydantic cannot see field by field; raise ConfigError naming the field."""
    problems = []
    if cfg.trial.output_dir is not None:
        problems.append(
            "trial.output_dir: set the sweep's output_dir instead (each trial writes to "
            "<output_dir>/trials/<trial id>)"
        )
    problems += _kind_problems(cfg) + _space_problems(cfg) + _point_problems(cfg)
    problems += _secret_problems(cfg)
    caps = {"trial.data.max_val": cfg.trial.data.max_val, "trial.data.max_test": cfg.trial.data.max_test}
    problems += shard_problems(cfg, cfg.trial, {k: n for k, n in caps.items() if n is not None}, "trial")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def shard_problems(cfg: SweepConfig, trial: TrialConfig, sizes: dict[str, int], origin: str) -> list[str]:
    """glm with ``resources.eval_tasks`` = k: every Jacobian pass is cut into k shards of at least one
    example, so k may not exceed the examples of the smallest evaluation split (``sizes``: what is known
    of validation and test, by name; the OOD sets' cap is added here)."""
    tasks = cfg.resources.eval_tasks
    laplace = cfg.kind == "layerwise" or cfg.laplace
    if not tasks or not laplace or trial.laplace.predictive != "glm":
        return []
    ood = trial.ood.far != "none" or bool(trial.ood.near)
    if cfg.kind == "layerwise" and ood:
        sizes = {**sizes, "trial.ood.max_examples": trial.ood.max_examples}
    if not sizes:
        return []
    split, n = min(sizes.items(), key=lambda item: item[1])
    if tasks <= n:
        return []
    return [
        f"resources.eval_tasks={tasks}: more glm shards than the {n} examples of the smallest evaluation "
        f"split ({split}, {origin}); lower resources.eval_tasks to at most {n}"
    ]


def _secret_problems(cfg: SweepConfig) -> list[str]:
    """No password in a store URI: the config is saved in config.yaml and logged to MLflow."""
    problems = []
    for field, uri in (("tracking.uri", cfg.tracking.uri), ("search.storage", cfg.search.storage)):
        if uri and urllib.parse.urlsplit(uri).password:
            problems.append(
                f"{field}: holds a password, which would be written to config.yaml and MLflow; drop it "
                "from the URI and give it to the client instead (PostgreSQL: ~/.pgpass or PGPASSFILE; "
                "an MLflow server: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
            )
    return problems


def _space_problems(cfg: SweepConfig) -> list[str]:
    """Every end of a searched range and every searched choice must be a valid trial setting."""
    problems = []
    for name, param in cfg.search.space.items():
        unknown = [v for v in param.ends() if name == SETTING and v not in cfg.settings]
        if unknown:
            problems.append(
                f"search.space.{SETTING}: {unknown} not among the named settings {sorted(cfg.settings)}"
            )
            continue
        for value in param.ends():
            try:
                trial_config(cfg, {name: value})
            except ConfigError as err:
                problems.append(
                    f"search.space.{name}: value {value!r} is not a valid trial setting ({_one_line(err)})"
                )
                break
    return problems


def _point_problems(cfg: SweepConfig) -> list[str]:
    """``points_to_evaluate`` name exactly the searched settings, and make valid trials."""
    problems = []
    for i, point in enumerate(cfg.search.points_to_evaluate):
        if set(point) != set(cfg.search.space):
            problems.append(
                f"search.points_to_evaluate[{i}]: keys {sorted(point)} must be exactly the "
                f"searched settings {sorted(cfg.search.space)}"
            )
            continue
        try:
            trial_config(cfg, point)
        except ConfigError as err:
            problems.append(f"search.points_to_evaluate[{i}]: {_one_line(err)}")
    return problems


def _kind_problems(cfg: SweepConfig) -> list[str]:
    problems = []
    if cfg.laplace and cfg.kind != "peft_methods":
        problems.append("laplace: only for kind=peft_methods (a layerwise sweep always fits Laplace)")
    if cfg.kind == "peft_methods" and not cfg.laplace and cfg.search.metric.startswith("bayes/"):
        problems.append(
            f"search.metric={cfg.search.metric}: kind=peft_methods without laplace=true has "
            "only map/* metrics (e.g. map/val/accuracy)"
        )
    if cfg.settings and SETTING not in cfg.search.space:
        problems.append(
            f"settings: named but never used; add search.space.{SETTING} "
            f"(kind: choice, values: {sorted(cfg.settings)})"
        )
    if SETTING in cfg.search.space and cfg.search.space[SETTING].kind != "choice":
        problems.append(f"search.space.{SETTING}: must be kind=choice over the names in `settings`")
    return problems


def _one_line(err: ConfigError) -> str:
    return str(err).removeprefix("invalid config:\n  ").replace("\n  ", "; ")


def load_sweep_config(
    path: str | Path | None = None, overrides: list[str] | None = None, exact: dict[str, Any] | None = None
) -> SweepConfig:
    """YAML file (optional) + ``key=value`` overrides + ``exact`` top-level values (paths, addresses:
    taken as they are, never parsed as YAML, where `` #`` starts a comment) -> a checked (not yet
    resolved) SweepConfig."""
    raw = read_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return check(build(SweepConfig, {**raw, **(exact or {})}))


def resolve(cfg: SweepConfig, *, now: float | None = None) -> SweepConfig:
    """Absolute output folder, tracking URI, Optuna storage and study name (Ray trials run elsewhere).

    Any folder name works (spaces, ``#``, quotes, ``{}``, any script) but two, refused by name: a
    ``?`` or a ``%XX`` escape, which SQLAlchemy reads as a URL query or character in the SQLite URLs of
    the default stores; and a study name (by default the folder's name) holding both ``'`` and ``"``,
    which MLflow's search filters (they find a sweep's runs by it) cannot express."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    out = Path(cfg.output_dir or f"runs/{cfg.name}-{stamp}").expanduser().resolve()
    if cfg.search.storage is None or cfg.tracking.uri is None:
        _check_url_safe(out)
    study_name = cfg.search.study_name or out.name
    if "'" in study_name and '"' in study_name:
        field = "search.study_name" if cfg.search.study_name else f"--output {str(out)!r}: the folder name"
        raise ConfigError(f"{field} holds both ' and \"; MLflow cannot search for it. Rename it")
    search = cfg.search.model_copy(
        update={"storage": cfg.search.storage or sqlite_url(out / "optuna.db"), "study_name": study_name}
    )
    tracking = cfg.tracking.model_copy(update={"uri": cfg.tracking.uri or sqlite_url(out / "mlflow.db")})
    return cfg.model_copy(update={"output_dir": str(out), "search": search, "tracking": tracking})


def _check_url_safe(out: Path) -> None:
    bad = "?" if "?" in str(out) else re.search(r"%[0-9A-Fa-f]{2}", str(out))
    if bad:
        shown = bad if isinstance(bad, str) else bad.group(0)
        raise ConfigError(
            f"--output {str(out)!r}: the path holds {shown!r}, which the SQLite URLs of the sweep's "
            "MLflow and Optuna stores (sqlite:///PATH) read as part of a URL; choose a folder without it"
        )


def sqlite_url(path: str | Path) -> str:
    """``sqlite:///`` + the absolute path, as it is (see :func:`resolve` for the two refused characters)."""
    return f"sqlite:///{path}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs); the inverse of :func:`sqlite_url`."""
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def max_concurrent(cfg: SweepConfig, cluster: dict[str, float]) -> int:
    """Trials at once: the configured cap, else how many trials' bundles the cluster's totals hold.

    Raises ConfigError when the cluster cannot hold even one trial (Tune would wait forever), or has no
    GPU for the GPU fraction of the evaluation tasks.
    """
    gpus = cfg.resources.gpus_per_eval_task
    if gpus and not cluster.get("GPU") and not cfg.resources.gpus_per_trial:  # else: the message below
        raise ConfigError(
            f"resources.gpus_per_eval_task={gpus:g}: the Ray cluster has no GPUs ({cluster.get('CPU', 0):g} "
            "CPUs); set resources.gpus_per_eval_task=0 or join a cluster with GPUs"
        )
    need = cfg.resources.per_trial()
    fits = [math.floor(cluster.get(key, 0.0) / amount + 1e-9) for key, amount in need.items() if amount]
    if min(fits) < 1:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs "
            f"(resources.*), but the Ray cluster has {cluster.get('CPU', 0):g} CPUs and "
            f"{cluster.get('GPU', 0):g} GPUs"
        )
    return min(cfg.resources.max_concurrent or min(fits), cfg.search.num_samples)
