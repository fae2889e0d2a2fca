"""The one vocabulary: every metric, parameter, tag and file name that leaves a process.

MLflow runs, the Optuna study, the ``*.json`` results, ``summary.csv``, the report's tables and its
plots all use the keys defined here, once, with a label, a unit and a direction (which way is better),
so that a key means one thing everywhere. Scores of a predictive are ``<predictive>/<split>/<score>``:

- ``map``:    the MAP network, softmax(f(x; θ*));
- ``bayes``:  the Laplace predictive with every tuned block Bayesian (the restricted posterior ``all``);
- ``subset``: the restricted posterior of the one layer subset a row or an MLflow run is about.

``<predictive>/<split>/delta_<score>`` is the improvement over the MAP on that split, signed so that
positive is better: ECE_MAP − ECE_S for lower-is-better scores, accuracy_S − accuracy_MAP for accuracy;
``..._low`` / ``..._high`` bound its interval. Training curves are ``epoch/...``, logged with the epoch
as step and never under a final metric's key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class Name:
    """One key: its label in tables and plots, its unit and which way is better (None: neither)."""

    key: str
    label: str
    unit: str = ""
    better: Direction | None = None

    def axis(self) -> str:
        """A plot axis label, e.g. ``'test ECE, MAP (lower is better)'``."""
        unit = f" [{self.unit}]" if self.unit else ""
        return f"{self.label}{unit}" + (f" ({self.better} is better)" if self.better else "")


# --- scores of a predictive on a split ------------------------------------------------------------

SCORES: dict[str, Name] = {
    n.key: n
    for n in (
        Name("accuracy", "accuracy", better="higher"),
        Name("ece", "ECE", better="lower"),
        Name("mce", "MCE", better="lower"),
        Name("nll", "NLL", "nats", better="lower"),
        Name("brier", "Brier score", better="lower"),
    )
}
PREDICTIVES = {
    "map": "MAP",
    "bayes": "Laplace, all blocks",
    "subset": "Laplace, subset",
    "subset_tuned": "Laplace, subset, its own validation-chosen λ",
    "temp": "temperature scaling",
    "lla": "last-layer Laplace",
}
SPLITS = {
    "val": "validation",
    "test": "test",
    "shift": "corrupted test (mean over corruptions and severities)",
}
OOD_SETS = {"near_ood": "near-OOD (classes the head never saw)", "far_ood": "far-OOD (another data set)"}
OOD_SCORES: dict[str, Name] = {
    n.key: n
    for n in (
        Name("auroc_maxprob", "AUROC of max-probability, in- vs out-of-distribution", better="higher"),
        Name("auroc_entropy", "AUROC of predictive entropy, in- vs out-of-distribution", better="higher"),
    )
}
DELTA = "delta_"
LOW, HIGH = "_low", "_high"


def _key(*parts: tuple[str, Mapping | tuple, str]) -> str:
    """``part/part/part`` from (value, allowed values, what it is); a value outside them is a KeyError."""
    for value, allowed, what in parts:
        if value not in allowed:
            raise KeyError(f"{value!r} is not a {what} of distlap.names ({', '.join(allowed)})")
    return "/".join(value for value, _, _ in parts)


def score(predictive: str, split: str, name: str) -> str:
    """``score("map", "test", "ece") == "map/test/ece"``; a name outside the vocabulary is a KeyError."""
    return _key((predictive, PREDICTIVES, "predictive"), (split, SPLITS, "split"), (name, SCORES, "score"))


def scores(predictive: str, split: str) -> dict[str, str]:
    """{score: key} of one predictive on one split, e.g. {"ece": "map/test/ece", ...}."""
    return {name: score(predictive, split, name) for name in SCORES}


def delta(predictive: str, split: str, name: str = "ece") -> str:
    """``delta("subset", "test") == "subset/test/delta_ece"``: the improvement over the MAP."""
    return score(predictive, split, name).rpartition("/")[0] + f"/{DELTA}{name}"


def ood(predictive: str, which: str, name: str) -> str:
    """``ood("map", "near_ood", "auroc_entropy") == "map/near_ood/auroc_entropy"``."""
    return _key(
        (predictive, PREDICTIVES, "predictive"), (which, OOD_SETS, "OOD set"), (name, OOD_SCORES, "OOD score")
    )


def interval(key: str) -> tuple[str, str]:
    """The keys of the lower and upper bound of ``key``'s interval."""
    return key + LOW, key + HIGH


def improvement(name: str, value: float, map_value: float) -> float:
    """``delta``'s value: positive when ``value`` is better than the MAP's ``map_value``."""
    return value - map_value if SCORES[name].better == "higher" else map_value - value


# --- everything else that is logged, tabled or plotted --------------------------------------------

TRAIN_LOSS = "epoch/train/loss"  # per epoch: mean cross-entropy of the epoch's batches
EPOCH_TIME = "epoch/time_s"  # per epoch: seconds of the epoch's training steps


def epoch_score(name: str) -> str:
    """Per epoch: the MAP's validation score during training (``epoch/val/ece``)."""
    return "epoch/" + score("map", "val", name).removeprefix("map/")


OPTUNA_TRIAL, TRIAL_ID, STATUS = "optuna_trial", "trial_id", "status"  # a trial's identity in tables
TUNED_PARAMS = "tuned_params"
TUNED_PARAMS_PCT = "tuned_params_pct"
TIME_PER_EPOCH = "time_per_epoch_s"
WALL_TIME = "wall_time_s"
PRIOR_PRECISION = "laplace/prior_precision"
PRIOR_METHOD = "laplace/prior_method"
HESSIAN = "laplace/hessian_structure"
BACKEND = "laplace/backend"
ESTIMATOR = "laplace/estimator"  # how the curvature is estimated: ggn (exact), mc, ef
MC_SAMPLES = "laplace/mc_samples"  # labels sampled per example (estimator mc)
PREDICTIVE = "laplace/predictive"
N_SAMPLES = "laplace/n_samples"
N_SAMPLE_SETS = "laplace/n_sample_sets"
BLOCK_UPDATE = "laplace/block_update"  # per block ‖θ*_b − θ₀_b‖: 0 = the MAP switched the block off
N_PARAMS = "laplace/n_params"
N_BLOCKS = "laplace/n_blocks"
FIT_EXAMPLES = "laplace/fit_examples"
FIT_TIME = "laplace/fit_s"
EVAL_TIME = "laplace/eval_s"
SUBSET_TIME = "subset/eval_s"
SUBSET_LAMBDA_VAL = "subset/lambda_val"  # λ_S: the validation NLL's choice over the grid (glm)
SUBSET_LAMBDA_MARGLIK = "subset/lambda_marglik"  # λ_S maximising the restricted posterior's evidence
TEMPERATURE = "temp/temperature"  # T of temperature scaling, fitted on validation NLL
LLA_PRIOR = "lla/prior_precision"  # last-layer Laplace's λ (marglik)
TEMP_TIME = "temp/fit_s"  # fitting the temperature (on the MAP's validation logits)
LLA_TIME = "lla/fit_s"  # fitting last-layer Laplace (curvature and marglik λ)
PROTOCOL_TIME = "protocol/eval_s"  # baselines, shift, OOD and the inference over every predictive
STATIONARITY = "stationarity"  # ‖∇ log joint‖ / ‖∇ NLL‖ at θ*, full training split
LBFGS_STEPS = "lbfgs_steps"
SHAPLEY = "shapley/delta_"  # + score: a block's Shapley value (MLflow: step = block index)
BEST_K = "best_k/delta_"  # + score: the value of the greedy best k blocks (MLflow: step = k)
BEST_SUBSET = "best_subset"
ACCURACY_PER_PCT = "accuracy_per_tuned_pct"  # test accuracy of the MAP (in %) per Tuned Params %
OBJECTIVE = "objective"
N_SEEDS = "n_seeds"
N_TRIALS, N_OK, N_FAILED = "sweep/n_trials", "sweep/n_ok", "sweep/n_failed"
BEST = "best/"  # prefix: the sweep run's copy of its best trial's metrics

_SCALARS: dict[str, Name] = {
    n.key: n
    for n in (
        Name(TRAIN_LOSS, "training loss", "nats", "lower"),
        Name(EPOCH_TIME, "time of the epoch", "s", "lower"),
        Name(TUNED_PARAMS, "tuned parameters", better="lower"),
        Name(TUNED_PARAMS_PCT, "tuned share of all parameters", "%", "lower"),
        Name(TIME_PER_EPOCH, "fine-tuning time per epoch", "s", "lower"),
        Name(WALL_TIME, "wall time of the trial", "s", "lower"),
        Name(OPTUNA_TRIAL, "Optuna trial"),
        Name(TRIAL_ID, "Ray trial"),
        Name(STATUS, "status"),
        Name(PRIOR_PRECISION, "prior precision λ of the posterior"),
        Name(PRIOR_METHOD, "how λ was chosen (fixed, marglik, gridsearch)"),
        Name(HESSIAN, "posterior precision structure"),
        Name(BACKEND, "GGN curvature backend"),
        Name(ESTIMATOR, "curvature estimator (ggn, mc, ef)"),
        Name(MC_SAMPLES, "labels sampled per example of the Monte-Carlo GGN"),
        Name(PREDICTIVE, "predictive (glm, nn)"),
        Name(N_SAMPLES, "posterior samples (one set)"),
        Name(N_SAMPLE_SETS, "independent sets of posterior samples"),
        Name(BLOCK_UPDATE, "‖θ* − θ₀‖ per block (0: the MAP switched the block off)"),
        Name(N_PARAMS, "parameters in the posterior"),
        Name(N_BLOCKS, "transformer blocks"),
        Name(FIT_EXAMPLES, "training examples of the curvature"),
        Name(FIT_TIME, "Laplace fit time", "s", "lower"),
        Name(EVAL_TIME, "time to evaluate every subset", "s", "lower"),
        Name(SUBSET_TIME, "time to evaluate the subset", "s", "lower"),
        Name(SUBSET_LAMBDA_VAL, "λ_S chosen on validation NLL"),
        Name(SUBSET_LAMBDA_MARGLIK, "λ_S maximising the marginal likelihood"),
        Name(TEMPERATURE, "temperature T (validation NLL)"),
        Name(LLA_PRIOR, "prior precision of last-layer Laplace (marglik)"),
        Name(TEMP_TIME, "time to fit temperature scaling", "s", "lower"),
        Name(LLA_TIME, "time to fit last-layer Laplace", "s", "lower"),
        Name(PROTOCOL_TIME, "time of the protocol (baselines, shift, OOD, inference)", "s", "lower"),
        Name(STATIONARITY, "‖∇ log joint‖ / ‖∇ NLL‖ at the MAP", better="lower"),
        Name(LBFGS_STEPS, "L-BFGS iterations to the MAP"),
        *(
            Name(SHAPLEY + s, f"Shapley value of a block for Δ{SCORES[s].label}", better="higher")
            for s in ("ece", "nll")
        ),
        *(
            Name(BEST_K + s, f"Δ{SCORES[s].label} of the greedy best k blocks", better="higher")
            for s in ("ece", "nll")
        ),
        Name(BEST_SUBSET, "subset with the largest validation Δ_ECE (selected on validation)"),
        Name(ACCURACY_PER_PCT, "Acc@1 points per Tuned Params %", better="higher"),
        Name(OBJECTIVE, "search objective (validation)"),
        Name(N_SEEDS, "training seeds"),
        Name(N_TRIALS, "trials"),
        Name(N_OK, "trials finished"),
        Name(N_FAILED, "trials failed"),
    )
}

# --- the prior, the training regime and the answer's robustness to theta-hat not being a mode ------

PRIOR_ANCHOR = "laplace/prior_anchor"  # theta0 of the LoRA factors: init (A at its initialisation) | zero
REGIME = "laplace/regime"  # posthoc (Laplace at the fine-tuned theta-hat) | mode (trained to stationarity)
SWITCH_OFF = "laplace/switch_off"  # zero anchor: per block, the test whether A = B = 0 is a local minimum
ROBUSTNESS = "robustness/"  # prefix: the layer-wise answer at theta-hat against after further optimisation
ROBUST_METHOD = ROBUSTNESS + "method"
ROBUST_STEPS = ROBUSTNESS + "steps"
ROBUST_TIME = ROBUSTNESS + "seconds"
ROBUST_BEFORE = ROBUSTNESS + "stationarity_before"
ROBUST_AFTER = ROBUSTNESS + "stationarity_after"
ROBUST_MOVED = ROBUSTNESS + "moved"
ROBUST_TAU = ROBUSTNESS + "kendall_tau"
ROBUST_TOP = ROBUSTNESS + "top_block_agrees"
ROBUST_GROUP = ROBUSTNESS + "best_group_agrees"
ROBUST_CHANGE = ROBUSTNESS + "max_delta_ece_change"
_SCALARS.update(
    {
        n.key: n
        for n in (
            Name(PRIOR_ANCHOR, "prior mean of the LoRA factors (init: A at its initialisation; zero)"),
            Name(REGIME, "training regime (posthoc: Laplace at the fine-tuned point; mode: stationary)"),
            Name(SWITCH_OFF, "zero anchor, per block: top singular value of ∇_W NLL against λ/(N·s)"),
            Name(ROBUST_METHOD, "how θ̂ was moved toward the mode (adam, lbfgs)"),
            Name(ROBUST_STEPS, "Adam epochs or L-BFGS steps from θ̂ toward the mode"),
            Name(ROBUST_TIME, "time of the refinement and the second study", "s", "lower"),
            Name(ROBUST_BEFORE, "stationarity at θ̂", better="lower"),
            Name(ROBUST_AFTER, "stationarity after the refinement", better="lower"),
            Name(ROBUST_MOVED, "the refinement at least halved the stationarity (or reached the mode)"),
            Name(ROBUST_TAU, "Kendall τ of the single-block Δ_ECE, at θ̂ vs refined", better="higher"),
            Name(ROBUST_TOP, "the top block (chosen on validation) is the same at both points"),
            Name(ROBUST_GROUP, "the best of early/mid/late (chosen on validation) is the same at both"),
            Name(
                ROBUST_CHANGE,
                "largest change of a subset's test Δ_ECE between the two points",
                better="lower",
            ),
        )
    }
)

# --- settings (config paths) that are searched or grouped by ---------------------------------------

SEED = "seed"
SETTING = "setting"  # the search key that picks a named bundle of trial settings
LAMBDA, LORA_RANK, METHOD = "train.prior_precision", "peft.rank", "peft.method"
BACKBONE, DATASET, EPOCHS = "backbone.name", "data.dataset", "train.epochs"
PARAMS: dict[str, Name] = {
    n.key: n
    for n in (
        Name(LAMBDA, "λ"),
        Name(LORA_RANK, "r"),
        Name(METHOD, "method"),
        Name(BACKBONE, "backbone"),
        Name(DATASET, "data set"),
        Name(EPOCHS, "epochs"),
        Name(SEED, "seed"),
        Name(SETTING, "setting"),
    )
}

# --- columns of the report's tables ----------------------------------------------------------------

CONFIG = "configuration"  # a setting of the searched parameters other than the seed, as a label
SUBSET, SUBSET_KIND, BLOCKS, FIRST_BLOCK = "subset", "kind", "blocks", "first_block"
RANK, CI_METHOD, SEEDS, TRIAL_IDS, HAS_RESULTS = "rank", "ci_method", "seeds", "trial_ids", "has_results"
MESSAGE = "message"  # why a trial failed, as its trial_result.json says
_COLUMNS: dict[str, Name] = {
    n.key: n
    for n in (
        Name(CONFIG, "configuration"),
        Name(SUBSET, "layer subset"),
        Name(SUBSET_KIND, "kind of subset (layer, group, all)"),
        Name(BLOCKS, "transformer blocks of the subset"),
        Name(FIRST_BLOCK, "first block of the subset"),
        Name(RANK, "rank by Δ_ECE (1 = largest)"),
        Name(CI_METHOD, "how the interval was made"),
        Name(SEEDS, "training seeds"),
        Name(TRIAL_IDS, "Ray trials"),
        Name(HAS_RESULTS, "has layer-wise results"),
        Name(MESSAGE, "message"),
    )
}

# --- inference over predictives and seeds (distlap.ranking, distlap.seed_intervals, analysis/lead.py) --

TEST_SET = "test_set"  # identity (a hash) of a trial's test set: equal across seeds = a crossed design
BOOTSTRAP_SEED = "bootstrap_seed"  # seed of a trial's example resamples, derived from its TEST_SET
RANKED_ON = "ranked_on"  # the split subsets were selected on: validation (test only in older results)
_COLUMNS.update(
    {
        n.key: n
        for n in (
            Name(TEST_SET, "identity of the test set (hash of its examples)"),
            Name(BOOTSTRAP_SEED, "seed of the example resamples (from the test set)"),
            Name(RANKED_ON, "split the subsets were selected on"),
        )
    }
)


def split_delta(split: str, name: str) -> str:
    """``split_delta("test", "ece") == "test/delta_ece"``: the improvement over the MAP as a column of a
    table whose rows are predictives (the lead table)."""
    return delta("map", split, name).removeprefix("map/")


# --- MLflow tags and Optuna user attributes --------------------------------------------------------

SWEEP_TAG = "distlap.sweep"  # the sweep id (= the Optuna study name) on every run of a sweep
KIND_TAG = "distlap.kind"  # sweep | trial | subset
ORDER_TAG = "distlap.order"  # sorts a sweep's runs as a tree: <sweep>, <sweep>/trial-000, .../trial-000/001
SUBSET_TAG = "distlap.subset"  # the layer subset of a subset run
TRIAL_TAG = "ray_trial_id"  # the Ray trial id: an MLflow tag and an Optuna user attribute
RUN_ID = "mlflow_run_id"  # Optuna user attribute, and the one non-searched key of a Ray trial's config
ERROR = "error"  # why a trial failed: an MLflow tag and an Optuna user attribute

# --- files of an output folder ---------------------------------------------------------------------

CONFIG_FILE = "config.yaml"  # the validated config (what --resume reads)
SUMMARY_FILE = "summary.csv"  # one row per trial of a sweep
TRIAL_FILE = "trial_result.json"  # one trial's status, metrics, history, config, provenance
LAYERWISE_FILE = "layer_wise_results.json"  # one trial's Laplace fit and every subset's row
POSTERIOR_FILE = "glm_posterior.safetensors"  # one trial's glm posterior at its λ (what an export needs)
TRIALS_DIR = "trials"  # <sweep>/trials/<ray trial id>/
RAY_DIR = "ray_results"
REPORT_DIR = "report"


def describe(key: str) -> Name:
    """The :class:`Name` of any key: a score, a delta or its bound, a ``best/`` copy, a scalar, a setting."""
    if key.startswith(BEST):
        inner = describe(key.removeprefix(BEST))
        return Name(key, f"{inner.label} (best trial)", inner.unit, inner.better)
    for suffix, word in ((LOW, "lower bound"), (HIGH, "upper bound")):
        if key.endswith(suffix) and DELTA in key:
            return Name(key, f"{describe(key.removesuffix(suffix)).label}, {word}")
    found = _SCALARS.get(key) or PARAMS.get(key) or _COLUMNS.get(key)
    if found is not None:
        return found
    return _composite(key)


def _composite(key: str) -> Name:
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "epoch":
        return Name(
            key,
            f"{SPLITS[parts[1]]} {SCORES[parts[2]].label} during training",
            SCORES[parts[2]].unit,
            SCORES[parts[2]].better,
        )
    if len(parts) == 3 and parts[0] in PREDICTIVES and parts[1] in OOD_SETS and parts[2] in OOD_SCORES:
        base = OOD_SCORES[parts[2]]
        return Name(key, f"{base.label} ({OOD_SETS[parts[1]]}, {PREDICTIVES[parts[0]]})", better="higher")
    if len(parts) != 3 or parts[0] not in PREDICTIVES or parts[1] not in SPLITS:
        raise KeyError(f"{key!r} is not a key of distlap.names")
    predictive, split, name = parts
    if name.startswith(DELTA):
        base = SCORES[name.removeprefix(DELTA)]
        return Name(key, f"Δ{base.label} over the MAP ({split}, {PREDICTIVES[predictive]})", better="higher")
    base = SCORES[name]
    return Name(key, f"{split} {base.label}, {PREDICTIVES[predictive]}", base.unit, base.better)
