"""Validated settings of one trial: typed pydantic models built from YAML plus ``key=value`` overrides
(:mod:`distlap.config_base`).

Every field carries its meaning in ``description``; an unknown key or a bad value fails here,
before any work starts, with a :class:`ConfigError` naming the field and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from distlap.config_base import ConfigError, build, deep_merge, parse_overrides, read_yaml, to_yaml
from distlap.config_base import Strict as _Strict
from distlap.zoo import TINY_BACKBONES

__all__ = [  # the loading helpers are re-exported: callers read settings from one module
    "ConfigError",
    "build",
    "deep_merge",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "to_yaml",
]


class DataConfig(_Strict):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100"] = Field(
        "fashion_mnist", description="Which data set the task is drawn from."
    )
    path: str | None = Field(
        None,
        description="fashion_mnist: directory with the idx(.gz) files (default "
        "/usr/share/datasets/fashion-mnist). cifar*: a `save_to_disk` directory, or a hub id "
        "(default uoft-cs/cifar10 / uoft-cs/cifar100).",
    )
    classes: list[int] | None = Field(
        None, description="Class subset of the task, relabelled 0..k-1 in this order; None = all classes."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the train split held out for validation."
    )
    max_train: int | None = Field(None, gt=0, description="Cap on training examples (seeded subsample).")
    max_val: int | None = Field(None, gt=0, description="Cap on validation examples.")
    max_test: int | None = Field(None, gt=0, description="Cap on test examples.")

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"need at least two distinct non-negative class ids, got {v}")
        return v


class BackboneConfig(_Strict):
    name: str = Field(
        "distlap/vit-tiny-fmnist",
        description="A hub id (google/vit-base-patch16-224), a local "
        "directory written by `save_pretrained`, or one of distlap's own tiny backbones "
        "(pretrained on the upstream classes on first use, then cached).",
    )
    cache_dir: str | None = Field(
        None, description="Where distlap's own tiny backbones are cached (default ~/.cache/distlap)."
    )


class PeftConfig(_Strict):
    method: Literal["lora", "norm", "hybrid"] = Field(
        "lora",
        description="lora: low-rank adapters; norm: LayerNorm tuning; hybrid: both. Head always trained.",
    )
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module-name suffixes LoRA adapts; None = the query and value projections "
        "under whichever names the installed transformers uses.",
    )


REFINE_UNITS = {"adam": "Adam epochs", "lbfgs": "L-BFGS steps"}  # what one unit of train.refine_steps is


class TrainConfig(_Strict):
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up.")
    prior_precision: float = Field(
        1.0,
        gt=0,
        description="Gaussian prior precision lambda on the tuned parameters (mean theta0: prior_anchor); "
        "the training objective is mean NLL + lambda / (2N) ||theta - theta0||^2, coupled (in the gradient).",
    )
    prior_anchor: Literal["init", "zero"] = Field(
        "init",
        description="theta0 of the LoRA factors. init: A at its seeded initialisation, B at 0 (BA = 0, yet "
        "the prior cannot switch a block off); zero: A and B at 0, a nuclear-norm penalty on BA that "
        "switches whole blocks off at strong lambda. The head is anchored at 0, LayerNorms at their "
        "pretrained value; theta0 is saved with the adapter.",
    )
    regime: Literal["posthoc", "mode"] = Field(
        "posthoc",
        description="posthoc (Laplace-LoRA's convention): the epochs only, the Laplace fit at that "
        "theta-hat; its distance from a mode is measured, and the layer-wise answer is recomputed after "
        "refine_steps more L-BFGS steps toward the mode. mode: L-BFGS after the epochs until stationary "
        "(stationarity_tol, max_lbfgs_steps); reachable at strong priors.",
    )
    refine_method: Literal["adam", "lbfgs"] = Field(
        "adam",
        description="posthoc, layer-wise: how theta-hat is moved toward the mode before the answer is "
        "recomputed (robustness/...): adam continued at refine_lr, or full-batch L-BFGS.",
    )
    refine_steps: int = Field(
        60, ge=0, description="The refinement's budget: Adam epochs, or L-BFGS steps. 0 = not measured."
    )
    refine_lr: float = Field(1e-2, gt=0, description="refine_method=adam: peak learning rate (cosine).")
    refine_to: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="posthoc: the refinement stops once the stationarity is refine_to times its value at "
        "theta-hat (0.5: halved; 0: at stationarity_tol, the mode).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA with bf16 autocast when present, else CPU fp32."
    )
    num_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; None = the CPUs this process may use."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; None = off.")
    stationarity_tol: float = Field(
        1e-2, gt=0, description="Stop L-BFGS once ||grad log joint|| <= tol * ||grad NLL|| at theta*."
    )
    max_lbfgs_steps: int = Field(
        500, ge=0, description="mode: cap on L-BFGS iterations (each about one pass over the training split)."
    )

    @model_validator(mode="after")
    def _budgets_of_the_regime(self) -> TrainConfig:
        if self.regime == "mode" and self.refine_steps and "refine_steps" in self.model_fields_set:
            raise ValueError(
                f"train.refine_steps={self.refine_steps} refines a posthoc theta-hat, but regime=mode "
                "trains to stationarity already: set train.refine_steps=0 (or train.regime=posthoc)"
            )
        return self


class LaplaceConfig(_Strict):
    """The Laplace stage: one fit over the tuned block parameters, then a restricted posterior per subset."""

    hessian_structure: Literal["diag", "kron"] = Field(
        "diag", description="Posterior precision structure (GGN). kron refuses LayerNorm parameters."
    )
    backend: Literal["auto", "exact", "curvlinops", "asdl", "backpack"] = Field(
        "auto",
        description="GGN curvature backend. auto: exact for diag, curvlinops for kron. exact: distlap's "
        "exact GGN diagonal (distlap/bayes/curvature.py; Linear and LayerNorm parameters), as fast as "
        "asdl. curvlinops: laplace-torch's exact path, 5-10x slower on CPU. asdl: its diag treats a "
        "ViT's tokens as independent examples (off by up to ~50% per parameter on a tiny ViT) and it "
        "cannot fit hybrid's LayerNorm copies. backpack refuses frozen parameters. Every diag backend "
        "but asdl equals a naive per-example Jacobian reference (tests/bayes/test_curvature.py).",
    )
    estimator: Literal["ggn", "mc", "ef"] = Field(
        "ggn", description="ggn: exact, C passes a batch; mc: Monte-Carlo GGN; ef: empirical Fisher (biased)"
    )
    mc_samples: int = Field(1, gt=0, description="estimator=mc: labels sampled per example.")
    fit_examples: int | None = Field(
        1000, gt=0, description="Seeded subset of the training split the Hessian is fitted on; None = all."
    )
    batch_size: int = Field(32, gt=0, description="Batch size of the fit and of Jacobian passes.")
    prior_method: Literal["fixed", "marglik", "gridsearch"] = Field(
        "fixed",
        description="The global lambda: fixed = train.prior_precision (the MAP's own prior); marglik: the "
        "exact maximiser of the Laplace evidence of the 'all' posterior; gridsearch: best validation NLL "
        "of the 'all' posterior over a log grid (10^-2..10^4). Each subset also gets its own lambda_S "
        "(glm: validation grid and marglik), recorded beside.",
    )
    include_norms: bool = Field(
        True,
        description="Put tuned LayerNorm parameters (norm / hybrid) into the posterior "
        "(diag only); False keeps them at the MAP.",
    )
    predictive: Literal["glm", "nn"] = Field(
        "glm",
        description="glm: the linearised predictive with the probit link (Laplace Redux's default; "
        "deterministic; one Jacobian pass serves every subset, every coalition and the Shapley values). "
        "nn: Monte-Carlo model averaging over n_samples posterior draws; meaningful only where the "
        "posterior is narrow enough that the sampled LoRA updates stay small beside the weights.",
    )
    n_samples: int = Field(30, gt=0, description="Posterior samples of the nn predictive (one set).")
    n_sample_sets: int = Field(
        3, gt=0, description="nn: independent sets of n_samples; Δ's interval covers examples and sets."
    )
    shapley_bootstrap: int = Field(
        200,
        ge=0,
        description="glm: bootstrap resamples of the test set for the Shapley intervals (0 = none).",
    )
    shapley_permutations: int = Field(
        1000, ge=2, description="glm, more than 16 blocks: permutations of sampled Shapley values."
    )
    subsets: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Extra named subsets of block indices, evaluated beside "
        "layer_0..layer_{L-1}, early, mid, late and all.",
    )
    n_bootstrap: int = Field(1000, gt=0, description="Paired bootstrap resamples for the Delta-ECE CI.")
    eval_batch_size: int = Field(256, gt=0)

    @field_validator("subsets")
    @classmethod
    def _named_blocks(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, blocks in v.items():
            if not blocks or min(blocks) < 0 or len(set(blocks)) != len(blocks):
                raise ValueError(f"subset {name!r} = {blocks}: name one or more distinct block indices >= 0")
        return v

    @model_validator(mode="after")
    def _exact_is_diagonal(self) -> LaplaceConfig:
        if self.backend == "exact" and self.hessian_structure != "diag":
            raise ValueError(
                "laplace.backend=exact computes the GGN diagonal only; for kron use "
                "laplace.backend=curvlinops (or auto)"
            )
        auto = {"diag": "exact", "kron": "curvlinops"}[self.hessian_structure]
        if self.estimator != "ggn" and self.curvature != auto:
            raise ValueError(f"laplace.estimator={self.estimator} needs laplace.backend=auto")
        return self

    @property
    def curvature(self) -> str:
        """The backend actually used (``auto`` resolved)."""
        if self.backend != "auto":
            return self.backend
        return "exact" if self.hessian_structure == "diag" else "curvlinops"


CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "rotation", "pixelate")


class ShiftConfig(_Strict):
    """Calibration under distribution shift: seeded corruptions of the test set (CIFAR-10-C's recipe)."""

    corruptions: list[Literal[CORRUPTIONS]] = Field(  # type: ignore[valid-type]
        list(CORRUPTIONS), description="distlap.finetune.shift corruptions of the test images; [] = no shift."
    )
    severities: list[int] = Field([1, 3, 5], description="Severities 1..5 (Hendrycks & Dietterich 2019).")
    max_examples: int | None = Field(
        500,
        gt=0,
        description="Test examples corrupted per (corruption, severity); None = the whole test set.",
    )
    cifar10c_path: str | None = Field(
        None, description="cifar10: a CIFAR-10-C folder (<corruption>.npy, labels.npy) to use instead."
    )

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= s <= 5 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"need distinct severities in 1..5, got {v}")
        return v


class OODConfig(_Strict):
    """Out-of-distribution inputs, told apart from the test set by max-probability and entropy (AUROC)."""

    near: bool | None = Field(
        None,
        description="Near-OOD: test images of the data set's classes the head never saw; None = on when "
        "data.classes is a subset or near_classes is given.",
    )
    near_classes: list[int] | None = Field(
        None, description="Those classes; None = every class outside data.classes (must not overlap them)."
    )
    far: Literal["digits", "svhn", "none"] = Field(
        "digits",
        description="Far-OOD: scikit-learn's bundled 8x8 digits (resized; no download), SVHN's "
        "test set (svhn_path), or none.",
    )
    svhn_path: str | None = Field(None, description="far=svhn: test_32x32.mat or its folder.")
    max_examples: int = Field(500, gt=0, description="OOD examples per set (seeded subsample).")


class TrialConfig(_Strict):
    """One fine-tuning trial. With no settings at all: the embedded default (tiny ViT, Fashion-MNIST)."""

    seed: int = Field(0, ge=0, description="Seeds data splits, initialisation, shuffling and sampling.")
    output_dir: str | None = Field(None, description="Where the trial writes results and the adapter.")
    n_bins: int = Field(15, gt=0, description="Equal-width confidence bins of ECE / MCE / reliability.")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    peft: PeftConfig = PeftConfig()
    train: TrainConfig = TrainConfig()
    laplace: LaplaceConfig = LaplaceConfig()
    baselines: bool = Field(
        True,
        description="Layer-wise study: also temperature scaling and last-layer Laplace on the same model.",
    )
    shift: ShiftConfig = ShiftConfig()
    ood: OODConfig = OODConfig()

    @model_validator(mode="after")
    def _ood_is_outside_the_task(self) -> TrialConfig:
        near, task = self.ood.near_classes, self.data.classes
        if near is not None and task is not None and set(near) & set(task):
            raise ValueError(
                f"ood.near_classes {near} overlap data.classes {task} in {sorted(set(near) & set(task))}: "
                "near-OOD classes must be ones the fine-tuned head never saw"
            )
        if task is None and (self.ood.near is True or near is not None):
            raise ValueError(
                "near-OOD (ood.near / ood.near_classes) needs data.classes (a subset): with every "
                "class fine-tuned none is left out; set ood.near=false"
            )
        if self.ood.far == "svhn" and not self.ood.svhn_path:
            raise ValueError("ood.far=svhn needs ood.svhn_path (test_32x32.mat or its folder)")
        for field, path in (
            ("shift.cifar10c_path", self.shift.cifar10c_path),
            ("ood.svhn_path", self.ood.svhn_path),
        ):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{field}={path!r} does not exist; download the set and pass its path")
        return self

    @model_validator(mode="before")
    @classmethod
    def _downstream_classes(cls, raw: Any) -> Any:
        """A tiny distlap backbone with no class subset given -> the classes it was NOT pretrained on."""
        if not isinstance(raw, dict):
            return raw
        backbone, data = raw.get("backbone") or {}, raw.get("data") or {}
        if not isinstance(backbone, dict) or not isinstance(data, dict):
            return raw
        recipe = TINY_BACKBONES.get(backbone.get("name", BackboneConfig.model_fields["name"].default))
        if recipe is None:
            return raw
        dataset = data.get("dataset", DataConfig.model_fields["dataset"].default)
        if dataset != recipe.dataset:
            raise ValueError(
                f"backbone.name={backbone.get('name')!r} is pretrained on {recipe.dataset} "
                f"images; data.dataset={dataset!r} needs a hub or local backbone"
            )
        if data.get("classes") is None:
            data = {**data, "classes": list(recipe.downstream_classes)}
        return {**raw, "data": data}

    @model_validator(mode="after")
    def _kron_excludes_norms(self) -> TrialConfig:
        la = self.laplace
        if la.hessian_structure == "kron" and self.peft.method == "norm":
            raise ValueError(
                "laplace.hessian_structure=kron cannot cover LayerNorm parameters and "
                "peft.method=norm tunes nothing else; use laplace.hessian_structure=diag"
            )
        if la.hessian_structure == "kron" and self.peft.method == "hybrid" and la.include_norms:
            raise ValueError(
                "laplace.hessian_structure=kron cannot cover the LayerNorm parameters of "
                "peft.method=hybrid; set laplace.include_norms=false or use diag"
            )
        return self


# --- loading -------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, model: type[BaseModel] = TrialConfig
):
    """YAML file (optional) + ``key=value`` overrides -> validated, frozen config object."""
    raw = read_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build(model, raw)
