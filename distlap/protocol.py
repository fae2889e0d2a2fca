"""The evaluation protocol of one fine-tuned trial beyond its layer subsets.

Beside every subset, on the same fine-tuned model: the MAP, **temperature scaling** (T fitted on
validation NLL) and **last-layer Laplace** (laplace-torch's standard recipe, marglik prior)
(:mod:`distlap.bayes.baselines`). Every one of these predictives is also scored under **shift** — seeded
corruptions of the test images at several severities (:mod:`distlap.finetune.shift`; ECE / NLL /
accuracy per corruption and severity in ``result["shift"]``, their mean as ``<predictive>/shift/<score>``)
— and on **out-of-distribution** inputs: near-OOD (the data set's classes the head never saw) and
far-OOD (scikit-learn's digits, or SVHN), by the AUROC of max-probability and of predictive entropy
against the test set (``<predictive>/{near,far}_ood/auroc_{maxprob,entropy}``).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from distlap import intervals, metrics, names, ranking
from distlap.bayes.baselines import (
    LastLayerLaplace,
    collect_logits,
    fit_last_layer_laplace,
    fit_temperature,
    head_module_name,
    last_layer_predict,
    temperature_scale,
)
from distlap.bayes.evaluate import Reference, predictive_row
from distlap.bayes.layerwise import Study
from distlap.finetune.data import load_raw, make_loader
from distlap.finetune.run import FineTuned
from distlap.finetune.shift import corrupt, digits_ood, held_out_classes, load_cifar10c, load_svhn_test
from distlap.runtime import Timer


@dataclass
class Baselines:
    """The fitted baselines (None when ``baselines: false``)."""

    temperature: float | None = None
    lla: LastLayerLaplace | None = None


def evaluate(ft: FineTuned, study: Study, log=print) -> dict:
    """Baselines, shift and OOD for ``ft`` and its layer-wise ``study``: adds ``baselines``, ``shift``
    and ``protocol`` to ``study.result`` and the shift / OOD metrics to every row (in place)."""
    result, start = study.result, time.perf_counter()
    fitted, rows = fit_baselines(ft, study) if ft.cfg.baselines else (Baselines(), {})
    test, sets, labels = _all_probs(study, fitted, ft.loader("test"))
    shift, details = shift_scores(ft, study, fitted, log)
    ood = ood_scores(ft, study, fitted, test)
    for name in test:
        row = rows.get(name) or result["subsets"].get(name) or result["map"]
        row["metrics"].update({**shift.get(name, {}), **ood.get(name, {})})
    result["baselines"], result["shift"] = rows, details
    result["inference"] = inference(sets, labels, ft, study)
    result["protocol"] = {
        names.TEMPERATURE: fitted.temperature,
        names.LLA_PRIOR: fitted.lla and fitted.lla.prior_precision,
        names.PROTOCOL_TIME: time.perf_counter() - start,  # baselines, shift, OOD and inference
    }
    return result


def fit_baselines(ft: FineTuned, study: Study) -> tuple[Baselines, dict]:
    """Temperature scaling (on the MAP's validation logits) and last-layer Laplace (on the curvature's
    training examples, marglik λ), and their rows, scored like a subset's, with their fitting seconds.

    One precision: both are fp32 predictives (temperature scaling of fp32 logits; laplace-torch's fp32
    copy of the model), so their MAP reference — the softmax of the same fp32 logits, no autocast — is
    the one the glm subsets are compared with (the Jacobian pass's logits), never the bf16-autocast
    MAP a GPU's ``runtime.predict`` gives (tests/bayes/test_gpu_precision.py)."""
    (val, val_y), (test, test_y) = (
        collect_logits(ft.model, ft.loader(s), ft.device) for s in ("val", "test")
    )
    ref = Reference(val.softmax(-1), test.softmax(-1), val_y, test_y)
    with Timer() as temp_t:
        temp = fit_temperature(val, val_y).temperature
    la_cfg = ft.cfg.laplace
    fit = ft.loader("train", batch_size=la_cfg.batch_size, max_examples=la_cfg.fit_examples)
    with Timer() as lla_t:
        lla = fit_last_layer_laplace(
            ft.model, fit, head=head_module_name(ft.model), n_train=len(ft.splits.train)
        )
    test_set = intervals.test_set_identity(*ft.splits.test.tensors)  # resampled as the subsets are
    kw = dict(n_bins=ft.cfg.n_bins, n_bootstrap=la_cfg.n_bootstrap, seed=intervals.bootstrap_seed(test_set))
    rows = {
        "temp": predictive_row("temp", *(temperature_scale(z, temp) for z in (val, test)), ref, **kw),
        "lla": predictive_row(
            "lla", *(last_layer_predict(lla, ft.loader(s))[0] for s in ("val", "test")), ref, **kw
        ),
    }
    rows["temp"]["metrics"][names.TEMP_TIME] = temp_t.seconds
    rows["lla"]["metrics"][names.LLA_TIME] = lla_t.seconds
    return Baselines(temp, lla), rows


def probs_on(ft: FineTuned, study: Study, fitted: Baselines, loader: DataLoader) -> dict[str, torch.Tensor]:
    """Every predictive's probabilities on ``loader`` (name -> (N, C)): one pass of the study's
    predictive for the MAP and the subsets, the temperature on the MAP's fp32 logits, last-layer Laplace."""
    return _all_probs(study, fitted, loader)[0]


def _all_probs(study: Study, fitted: Baselines, loader: DataLoader) -> tuple[dict, dict, torch.Tensor]:
    """:func:`probs_on`, with the nn subsets' per-set probabilities (K, N, C) and the labels.

    ``map`` is the study's own reference (glm: the fp32 logits of its Jacobian pass; nn: its autocast
    forward). Temperature scaling divides fp32 logits (no autocast, not the log of rounded
    probabilities), as when T was fitted; last-layer Laplace runs in laplace-torch's fp32 copy."""
    pred = study.predictive(loader, study.subsets)
    out = {"map": pred.map, **pred.subsets}
    if fitted.temperature is not None:
        logits, _ = collect_logits(study.predictive.model, loader, study.predictive.device)
        out["temp"] = temperature_scale(logits, fitted.temperature)
    if fitted.lla is not None:
        out["lla"] = last_layer_predict(fitted.lla, loader)[0]
    return out, {**out, **(pred.sets or {})}, pred.labels


def inference(probs: dict[str, torch.Tensor], labels: torch.Tensor, ft: FineTuned, study: Study) -> dict:
    """``result["inference"]``: paired bootstrap replicates of every predictive's improvement over the MAP
    on test (ECE, NLL, accuracy; two-level for nn sample sets), and from them which predictives are
    distinguishable from the MAP and from each other (:func:`distlap.ranking.trial_inference`: Bonferroni-t
    p-values and simultaneous intervals that agree). The example resamples are seeded by the test
    set and its identity is recorded, so that seeds sharing a test set pool as crossed and seeds with their
    own test draw (``data.max_test``) as nested (:func:`distlap.seed_intervals.pool`)."""
    n_bins, la = ft.cfg.n_bins, ft.cfg.laplace
    others = {n: p for n, p in probs.items() if n != "map"}
    scores = {
        "ece": (functools.partial(metrics.expected_calibration_error, n_bins=n_bins), False),
        "nll": (metrics.negative_log_likelihood, False),
        "accuracy": (metrics.accuracy, True),
    }
    test_set = intervals.test_set_identity(*ft.splits.test.tensors)
    out = ranking.trial_inference(
        probs["map"], others, labels, scores, test_set=test_set, n_resamples=la.n_bootstrap
    )
    return {**out, "training_seed": ft.cfg.seed, "subsets": list(study.subsets)}


def _prefix(name: str, study: Study) -> str:
    """The vocabulary's predictive of a name: ``subset`` for a layer subset, else the name itself."""
    return "subset" if name in study.subsets else name


# --- shift -----------------------------------------------------------------------------------------


def shifted_sets(ft: FineTuned) -> list[tuple[str, TensorDataset]]:
    """(``corruption/severity``, corrupted test examples) for every configured corruption and severity:
    distlap's seeded corruptions of the task's test images, or CIFAR-10-C from ``shift.cifar10c_path``."""
    cfg = ft.cfg.shift
    images, labels = ft.splits.test.tensors
    if cfg.max_examples is not None and cfg.max_examples < len(labels):
        g = torch.Generator().manual_seed(ft.cfg.seed)
        keep = torch.randperm(len(labels), generator=g)[: cfg.max_examples].sort().values
        images, labels = images[keep], labels[keep]
    sets = []
    for corruption in cfg.corruptions:
        for severity in cfg.severities:
            if cfg.cifar10c_path:
                x, y = _cifar10c(ft, corruption, severity)
            else:
                x, y = corrupt(images, corruption, severity, seed=ft.cfg.seed), labels
            sets.append((f"{corruption}/{severity}", TensorDataset(x, y)))
    return sets


def _cifar10c(ft: FineTuned, corruption: str, severity: int):
    """One CIFAR-10-C block, kept to the task's classes (relabelled as the task is) and capped."""
    x, y = load_cifar10c(ft.cfg.shift.cifar10c_path, corruption, severity)
    classes = ft.cfg.data.classes
    if classes is not None:
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[classes] = torch.arange(len(classes))
        keep = lookup[y] >= 0
        x, y = x[keep], lookup[y][keep]
    cap = ft.cfg.shift.max_examples
    return x[:cap], y[:cap]


def shift_scores(ft: FineTuned, study: Study, fitted: Baselines, log) -> tuple[dict, dict]:
    """Per predictive: ``<pred>/shift/<score>`` (the mean over the sets) and its delta over the MAP;
    and the per-set scores (``{pred: {"gaussian_noise/3": {...}}}``)."""
    sets = shifted_sets(ft)
    if not sets:
        return {}, {}
    log(f"[distlap] shift: {len(sets)} corrupted test sets of {len(sets[0][1])} examples")
    dataset = ConcatDataset([d for _, d in sets])
    loader = make_loader(
        dataset, ft.cfg.laplace.eval_batch_size, shuffle=False, seed=0, transform=ft.transform
    )
    probs = probs_on(ft, study, fitted, loader)
    labels = torch.cat([d.tensors[1] for _, d in sets])
    bounds = np.cumsum([0, *(len(d) for _, d in sets)])
    details = {
        p: {
            name: metrics.summarize(pr[a:b], labels[a:b], ft.cfg.n_bins)
            for (name, _), a, b in zip(sets, bounds, bounds[1:])
        }
        for p, pr in probs.items()
    }
    means = {
        p: {s: float(np.mean([row[s] for row in d.values()])) for s in names.SCORES}
        for p, d in details.items()
    }
    out = {}
    for pred, mean in means.items():
        key = _prefix(pred, study)
        out[pred] = {names.score(key, "shift", s): v for s, v in mean.items()}
        if pred != "map":
            out[pred] |= {
                names.delta(key, "shift", s): names.improvement(s, v, means["map"][s])
                for s, v in mean.items()
            }
    return out, details


# --- out of distribution ---------------------------------------------------------------------------


def ood_sets(ft: FineTuned) -> list[tuple[str, TensorDataset]]:
    """(``near_ood`` / ``far_ood``, images with dummy labels) as configured: the data set's held-out
    classes, and the far set in the task's raw layout (seeded subsamples of ``ood.max_examples``)."""
    cfg, sets = ft.cfg, []
    images = ft.splits.test.tensors[0]
    near = cfg.ood.near if cfg.ood.near is not None else cfg.data.classes is not None
    if near:
        raw = load_raw(cfg.data.dataset, cfg.data.path)
        x, _ = held_out_classes(
            torch.from_numpy(raw[2]), torch.from_numpy(raw[3]), cfg.data.classes or [], cfg.ood.near_classes
        )
        sets.append(("near_ood", x))
    if cfg.ood.far == "digits":
        sets.append(
            (
                "far_ood",
                digits_ood(min(cfg.ood.max_examples, 1797), images.shape[-1], images.shape[1], seed=cfg.seed),
            )
        )
    elif cfg.ood.far == "svhn":
        sets.append(("far_ood", load_svhn_test(cfg.ood.svhn_path)[0]))
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for name, x in sets:
        x = x[torch.randperm(len(x), generator=g)[: cfg.ood.max_examples]]
        out.append((name, TensorDataset(x, torch.zeros(len(x), dtype=torch.long))))
    return out


def ood_scores(ft: FineTuned, study: Study, fitted: Baselines, test: dict) -> dict[str, dict]:
    """Per predictive and OOD set: the AUROC of max-probability and of entropy, the test set positive."""
    out: dict[str, dict] = {p: {} for p in test}
    for which, dataset in ood_sets(ft):
        loader = make_loader(
            dataset, ft.cfg.laplace.eval_batch_size, shuffle=False, seed=0, transform=ft.transform
        )
        for pred, probs in probs_on(ft, study, fitted, loader).items():
            aurocs = metrics.ood_aurocs(test[pred], probs)
            out[pred] |= {
                names.ood(_prefix(pred, study), which, s): v for s, v in aurocs.items() if not math.isnan(v)
            }
    return out
