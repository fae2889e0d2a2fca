"""The layer-wise Laplace study of one fine-tuned trial.

Fit one Laplace approximation over the tuned block parameters, then for every subset S
(``layer_0 .. layer_{L-1}``, ``early`` / ``mid`` / ``late``, ``all`` and user-defined ones) evaluate the
restricted posterior's predictive on validation and test against the MAP, and write
``layer_wise_results.json`` plus reliability diagrams. With Ray running, each ``nn`` subset evaluation
is a Ray task (model, posterior and data shared through the object store); without it the very same
function runs serially, with identical numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from distlap import metrics
from distlap.evaluate import Reference, Timer, map_row, subset_metrics
from distlap.layers import num_blocks, standard_subsets
from distlap.plots import reliability_diagram
from distlap.posterior import Posterior, build_posterior, fit_subset_loader
from distlap.predictive import ViTSuffix, glm_predictive, nn_predictive
from distlap.runtime import set_threads
from distlap.train import predict

RESULTS_FILE = "layer_wise_results.json"


def layer_subsets(n_blocks: int, extra: dict[str, list[int]] | None = None) -> dict[str, tuple[int, ...]]:
    subsets = standard_subsets(n_blocks)
    for name, blocks in (extra or {}).items():
        bad = [b for b in blocks if not 0 <= b < n_blocks]
        if not blocks or bad or name in subsets:
            raise ValueError(f"laplace.subsets.{name}={blocks}: need a new name and block indices in "
                             f"0..{n_blocks - 1} (the model has {n_blocks} blocks)")
        subsets[name] = tuple(blocks)
    return subsets


def evaluate_nn_subset(model, posterior: Posterior, blocks: Sequence[int], val_loader, test_loader,
                       ref: Reference, device, *, n_bins: int, n_bootstrap: int, seed: int) -> dict:
    """Restricted posterior of ``blocks`` -> the subset's JSON row (nn predictive)."""
    with Timer() as t:
        x0 = next(iter(val_loader))[0][:2].to(device)
        runner = ViTSuffix.try_build(model.eval().to(device), x0)  # None: full forward per sample
        val_probs, _ = nn_predictive(model, posterior, blocks, val_loader, device, runner)
        test_probs, _ = nn_predictive(model, posterior, blocks, test_loader, device, runner)
        row = subset_metrics(blocks, val_probs, test_probs, ref, n_bins=n_bins,
                             n_bootstrap=n_bootstrap, seed=seed)
    row["time_s"] = t.seconds
    return row


def _remote_nn_subset(model, posterior, blocks, val, test, transform, ref, device, kw, batch, threads):
    """Body of one Ray task: rebuild the loaders there and evaluate one subset."""
    from distlap.data import make_loader

    set_threads(threads)
    loaders = [make_loader(ds, batch, shuffle=False, seed=0, transform=transform) for ds in (val, test)]
    return evaluate_nn_subset(model, posterior, blocks, *loaders, ref, device, **kw)


def _ray_rows(ft, posterior, subsets, ref, kw, task_resources, log) -> dict[str, dict]:
    import ray

    resources = {"num_cpus": 1, **(task_resources or {})}
    device = torch.device("cuda" if resources.get("num_gpus") and torch.cuda.is_available() else "cpu")
    task = ray.remote(_remote_nn_subset).options(max_retries=3, retry_exceptions=False, **resources)
    shared = [ray.put(obj) for obj in (ft.model.cpu(), posterior, ft.splits.val, ft.splits.test)]
    futures = {name: task.remote(*shared[:2], blocks, *shared[2:], ft.transform, ref, device, kw,
                                 ft.cfg.laplace.eval_batch_size, int(resources["num_cpus"]))
               for name, blocks in subsets.items()}
    log(f"[distlap] evaluating {len(futures)} subsets as Ray tasks ({resources})")
    rows = {}
    for name, future in futures.items():
        rows[name] = ray.get(future)
        log(f"[distlap]   {_row_line(name, rows[name])}")
    return rows


def _row_line(name: str, row: dict) -> str:
    d = row["delta_ece"]
    return (f"{name:>9}: test ECE {row['test']['ece']:.4f}, delta_ece {d['estimate']:+.4f} "
            f"[{d['low']:+.4f}, {d['high']:+.4f}], NLL {row['test']['nll']:.4f}"
            + (f" ({row['time_s']:.1f}s)" if row["time_s"] is not None else ""))


def run_layerwise(ft, *, log=print, parallel: bool | None = None, task_resources: dict | None = None,
                  only: Sequence[str] | None = None) -> dict:
    """Fit once, evaluate every subset, write results if ``ft.cfg.output_dir`` is set; return the dict.

    ``only``: evaluate just these subsets (e.g. ``("all",)``: the posterior of every tuned block).
    ``parallel``: None = Ray tasks if Ray is initialised (nn predictive), True = require Ray,
    False = serial. ``task_resources``: Ray resources of each subset task, e.g. {"num_cpus": 1,
    "num_gpus": 0.25}.
    """
    cfg, la = ft.cfg, ft.cfg.laplace
    model, device = ft.model, ft.device
    val_loader, test_loader = (ft.loader(s, batch_size=la.eval_batch_size) for s in ("val", "test"))
    val_probs, val_labels = predict(model, val_loader, device)      # the MAP reference
    test_probs, test_labels = predict(model, test_loader, device)
    ref = Reference(val_probs, test_probs, val_labels, test_labels)
    subsets = layer_subsets(num_blocks(model), la.subsets)
    every = subsets["all"]
    if only is not None:
        unknown = set(only) - set(subsets)
        if unknown:
            raise ValueError(f"no layer subsets named {sorted(unknown)}; the model has {sorted(subsets)}")
        subsets = {name: subsets[name] for name in only}
    kw = dict(n_bins=cfg.n_bins, n_bootstrap=la.n_bootstrap, seed=cfg.seed)

    def val_nll(post: Posterior) -> float:  # gridsearch scorer: the 'all' posterior on validation
        probs = _predict_val(model, post, every, val_loader, device, la)
        return metrics.negative_log_likelihood(probs, ref.val_labels)

    log(f"[distlap] fitting {la.hessian_structure} Laplace ({la.curvature}) on "
        f"{min(la.fit_examples or 10**12, len(ft.splits.train))} training examples")
    fit_loader = fit_subset_loader(ft.splits.train, la, cfg.seed, ft.transform)
    posterior = build_posterior(model, cfg.peft.method, fit_loader, la, prior_precision=cfg.train.prior_precision,
                                seed=cfg.seed, n_train=len(ft.splits.train), val_nll=val_nll)
    log(f"[distlap] posterior over {posterior.n_params:,} parameters, prior precision "
        f"{posterior.prior_precision:g} ({posterior.prior_method}), fit {posterior.fit_s:.1f}s")
    with Timer() as t:
        if la.predictive == "glm":
            rows = _glm_rows(model, posterior, subsets, val_loader, test_loader, ref, device, la, kw, log)
        elif parallel or (parallel is None and _ray_running()):
            rows = _ray_rows(ft, posterior, subsets, ref, kw, task_resources, log)
        else:
            rows = {}
            for name, blocks in subsets.items():
                rows[name] = evaluate_nn_subset(model, posterior, blocks, val_loader, test_loader, ref,
                                                device, **kw)
                log(f"[distlap]   {_row_line(name, rows[name])}")
    result = {
        "prior_precision": posterior.prior_precision, "prior_method": posterior.prior_method,
        "hessian_structure": la.hessian_structure, "backend": la.curvature, "predictive": la.predictive,
        "link_approx": la.link_approx if la.predictive == "glm" else None, "n_samples": la.n_samples,
        "n_params": posterior.n_params, "n_blocks": num_blocks(model), "fit_examples": posterior.fit_examples,
        "map": map_row(ref, cfg.n_bins), "subsets": rows,
        "timing": {"fit_s": posterior.fit_s, "eval_s": t.seconds},
    }
    if cfg.output_dir:
        write_results(result, Path(cfg.output_dir))
    return result


def _predict_val(model, post, blocks, val_loader, device, la) -> torch.Tensor:
    if la.predictive == "glm":
        probs, _ = glm_predictive(model, post, {"all": blocks}, val_loader, device, la.link_approx)
        return probs["all"]
    return nn_predictive(model, post, blocks, val_loader, device, None)[0]


def _glm_rows(model, posterior, subsets, val_loader, test_loader, ref, device, la, kw, log) -> dict:
    """GLM: one Jacobian pass per batch serves every subset, so it runs in this process."""
    val, _ = glm_predictive(model, posterior, subsets, val_loader, device, la.link_approx)
    test, _ = glm_predictive(model, posterior, subsets, test_loader, device, la.link_approx)
    rows = {}
    for name, blocks in subsets.items():
        rows[name] = {**subset_metrics(blocks, val[name], test[name], ref, **kw), "time_s": None}
        log(f"[distlap]   {_row_line(name, rows[name])}")
    return rows


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def write_results(result: dict, out: Path) -> None:
    """``layer_wise_results.json`` and ``plots/reliability_{map,<subset>}.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    plots = out / "plots"
    reliability_diagram(result["map"]["reliability"], "MAP", plots / "reliability_map.png",
                        result["map"]["test"]["ece"])
    for name, row in result["subsets"].items():
        reliability_diagram(row["reliability"], f"Laplace on {name}", plots / f"reliability_{name}.png",
                            row["test"]["ece"])


def main(argv: list[str] | None = None) -> int:
    """``python -m distlap.layerwise [--config X.yaml] [key=value ...] [--output DIR]``: one trial,
    fine-tuned and then evaluated layer-wise, without Ray."""
    import argparse
    import sys

    from distlap.backbones import BackboneError
    from distlap.config import ConfigError, load_config
    from distlap.data import DataError
    from distlap.trial import fine_tune

    parser = argparse.ArgumentParser(prog="python -m distlap.layerwise", description=main.__doc__.split(":")[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output.resolve()}"] if args.output else [])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        cfg = load_config(args.config, overrides)
        ft = fine_tune(cfg, log=log)
        if ft.train.status != "ok":
            return 1
        result = run_layerwise(ft, log=log, parallel=False)
    except (ConfigError, DataError, BackboneError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ranked = sorted(result["subsets"].items(), key=lambda kv: -kv[1]["delta_ece"]["estimate"])
    print(json.dumps({name: row["delta_ece"] for name, row in ranked}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
