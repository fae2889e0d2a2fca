"""The searched settings of a sweep: what Optuna explores (a range or a choice per trial setting), with
which sampler, on which validation objective, stored where. Checked here, before Ray starts."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distlap import names
from distlap.config import _Strict

OBJECTIVES = [names.score(predictive, "val", s) for predictive in ("bayes", "map") for s in names.SCORES]


class SearchParam(_Strict):
    """One searched trial setting: a float range (log-uniform or uniform) or a categorical choice."""

    kind: Literal["loguniform", "uniform", "choice"] = Field(
        description="loguniform / uniform: a float in [low, high]; choice: one of `values`."
    )
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = Field(None, description="The categories of `choice`.")

    @model_validator(mode="after")
    def _bounds(self) -> SearchParam:
        if self.kind == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("kind=choice needs a non-empty `values` list and no low/high")
        elif self.values is not None or self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(
                f"kind={self.kind} needs low < high and no `values` (got low={self.low}, high={self.high})"
            )
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"kind=loguniform needs low > 0 (got {self.low})")
        return self

    def ends(self) -> list[Any]:
        """The values that must all be valid trial settings: both ends of a range, every category."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


def _default_space() -> dict[str, SearchParam]:
    return {
        "train.prior_precision": SearchParam(kind="loguniform", low=1e-1, high=1e3),
        "peft.rank": SearchParam(kind="choice", values=[2, 4, 8, 16]),
    }


class SearchConfig(_Strict):
    """Optuna over the trial settings in ``space``: TPE selecting on a validation-split metric, or a grid."""

    space: dict[str, SearchParam] = Field(
        default_factory=_default_space, description="Dotted trial setting -> its distribution."
    )
    sampler: Literal["tpe", "grid"] = Field(
        "tpe",
        description="tpe: Optuna's TPE; grid: every combination of the `choice` values, once each "
        "(num_samples defaults to the grid's size).",
    )
    metric: str = Field(
        "bayes/val/nll",
        description="Objective: {bayes,map}/val/{accuracy,ece,mce,nll,brier}; bayes = "
        "the Laplace predictive with every block stochastic (subset 'all'). Never a test metric.",
    )
    mode: Literal["min", "max"] | None = Field(None, description="None = max for accuracy, else min.")
    num_samples: int = Field(4, gt=0, description="Trials in the sweep (Optuna trials, Ray trials).")
    seeds: list[int] | None = Field(
        None,
        description="Training seeds: each configuration the search proposes runs once per seed (as "
        "trial.seed), so num_samples must be a multiple of their number; None = trial.seed alone.",
    )
    seed: int = Field(0, ge=0, description="Seed of Optuna's TPE sampler.")
    startup: int | None = Field(
        None,
        gt=0,
        description="TPE: configurations drawn at random before TPE models the finished ones; None = half "
        "the sweep's configurations (at least 1, at most 10, Optuna's default). With Optuna's 10 a "
        "sweep of 4 configurations would never leave random search.",
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Settings tried first (e.g. the lambda=1 baseline); keys are "
        "the names in `space`, each point names all of them.",
    )

    def startup_trials(self) -> int:
        """TPE's ``n_startup_trials``: :attr:`startup` configurations, each counted once per seed."""
        per_config = len(self.seeds or [0])
        configs = max(1, self.num_samples // per_config)
        return (self.startup or min(10, max(1, configs // 2))) * per_config

    storage: str | None = Field(
        None, description="Optuna storage (SQLAlchemy URL); None = sqlite:///<output_dir>/optuna.db."
    )
    study_name: str | None = Field(None, description="None = the output folder's name (stable on resume).")

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, v: Any) -> Any:
        """Nested YAML ({train: {prior_precision: {kind: ...}}}, what ``key=value`` overrides produce)
        -> dotted names; a null entry removes a setting from the space."""
        if not isinstance(v, dict):
            return v
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and "kind" not in node:
                for key, child in node.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), child)
            elif node is not None:
                flat[prefix] = node

        walk("", v)
        return flat

    @field_validator("space")
    @classmethod
    def _not_empty(cls, v: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if not v:
            raise ValueError("name at least one trial setting to search (e.g. train.prior_precision)")
        return v

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        if v not in OBJECTIVES:
            raise ValueError(f"{v!r} is not a validation-split objective; use one of {', '.join(OBJECTIVES)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"need distinct seeds >= 0 (or leave seeds out for trial.seed alone), got {v}")
        return v

    @property
    def n_seeds(self) -> int:
        return len(self.seeds or [0])

    @model_validator(mode="after")
    def _seeds_divide(self) -> SearchConfig:
        if names.SEED in self.space and (self.sampler != "grid" or self.seeds is not None):
            raise ValueError(
                "search.space.seed: list training seeds in search.seeds (a grid may also take them as a "
                "choice; TPE would optimise the seed like a setting)"
            )
        if self.sampler != "grid" and self.num_samples % self.n_seeds:
            raise ValueError(
                f"search.num_samples={self.num_samples} is not a multiple of the {self.n_seeds} "
                f"search.seeds {self.seeds}: every configuration runs once per seed"
            )
        if len(self.points_to_evaluate) * self.n_seeds > self.num_samples:
            raise ValueError(
                f"search.points_to_evaluate: {len(self.points_to_evaluate)} points x {self.n_seeds} seeds "
                f"need search.num_samples >= {len(self.points_to_evaluate) * self.n_seeds}"
            )
        return self

    @model_validator(mode="after")
    def _grid(self) -> SearchConfig:
        if self.sampler != "grid":
            return self
        ranges = [name for name, p in self.space.items() if p.kind != "choice"]
        if ranges:
            raise ValueError(
                f"search.sampler=grid needs kind=choice for every setting; {', '.join(ranges)} are ranges"
            )
        if self.points_to_evaluate:
            raise ValueError("search.sampler=grid evaluates every point already; drop points_to_evaluate")
        runs = self.grid_size * self.n_seeds
        if "num_samples" not in self.model_fields_set:
            object.__setattr__(self, "num_samples", runs)  # frozen model, still validating
        elif self.num_samples != runs:
            raise ValueError(
                f"search.num_samples={self.num_samples} but the grid has {self.grid_size} points x "
                f"{self.n_seeds} seeds; drop search.num_samples (a grid runs each point once per seed)"
            )
        return self

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.space.values())

    @property
    def direction(self) -> Literal["min", "max"]:
        return self.mode or ("max" if names.describe(self.metric).better == "higher" else "min")
