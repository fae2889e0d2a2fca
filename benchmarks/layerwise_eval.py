"""Layer-wise evaluation: distlap's engine against the naive loop a laplace-torch user writes, one run.

glm  A: one Laplace fit, one Jacobian pass over the test set (:func:`distlap.bayes.glm.glm_pass`), the
        probit predictive of each of the 10 standard subsets.
     B: per subset a fresh ``Laplace`` with only that subset trainable, ``fit``, then
        ``la(x, pred_type="glm", link_approx="probit")`` over the test set.
     A+: A for all 2^L coalitions and the exact Shapley values of Δ_ECE and Δ_NLL (bootstrap off).
nn   A: one fit, K samples shared by every subset, only the blocks from the subset's first on re-run.
     B: per subset a fresh fit and ``la(x, pred_type="nn", link_approx="mc", n_samples=K)``.

Both sides use the same fine-tuned model (the layer-wise sweep's default trial), the same fit and test
examples, prior and the SAME curvature backend (``--backend``, default distlap's exact GGN diagonal),
so a ratio measures the design, not the backend. glm probabilities must agree to 1e-5 (printed).
Memory: the peak resident set during each side (CPU) or peak allocated CUDA memory.

    python benchmarks/layerwise_eval.py                    # the sweep default, CPU
    python benchmarks/layerwise_eval.py --n-test 4000      # the engine's memory does not grow with N
    python benchmarks/layerwise_eval.py --prior-precision 10 --lbfgs-steps 500   # at a (near) mode
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psutil
import torch

from distlap.bayes import attribution, glm
from distlap.bayes.layers import block_index, layer_subsets, num_blocks
from distlap.bayes.posterior import (
    BACKENDS,
    backend_class,
    build_posterior,
    fit_laplace,
    posterior_parameters,
)
from distlap.bayes.predictive import ViTSuffix, nn_predictive
from distlap.provenance import write_benchmark
from distlap.sweep.settings import load_sweep_config

DEFAULT = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "default.yaml"


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated CUDA memory over a ``with`` block, in GiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._poll, args=(psutil.Process(),), daemon=True)
            self._thread.start()
        self.start = time.perf_counter()
        return self

    def _poll(self, proc):
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.gib = self.peak / 2**30


def setup(args):
    """The sweep default's trial at the searched settings given here, fine-tuned once for both sides."""
    from distlap.finetune.run import fine_tune

    sweep = load_sweep_config(DEFAULT)
    train = {"prior_precision": args.prior_precision}
    if args.lbfgs_steps:  # the mode regime, L-BFGS after the epochs (0 or none: the posthoc theta-hat)
        train |= {"regime": "mode", "max_lbfgs_steps": args.lbfgs_steps}
    overrides = {"data": {"max_test": args.n_test}, "train": train}
    cfg = sweep.trial.model_copy(
        update={
            "data": sweep.trial.data.model_copy(update=overrides["data"]),
            "train": sweep.trial.train.model_copy(update=overrides["train"]),
        }
    )
    ft = fine_tune(cfg, log=lambda m: None)
    # one sample set of K: the naive loop draws K samples per subset, so both sides run K forward passes
    update = {"backend": args.backend, "n_samples": args.samples, "n_sample_sets": 1}
    la_cfg = cfg.laplace.model_copy(update=update)
    fit = ft.loader("train", batch_size=la_cfg.batch_size, max_examples=la_cfg.fit_examples)
    return ft, la_cfg, fit, ft.loader("test", batch_size=la_cfg.eval_batch_size)


def engine_glm(ft, la_cfg, fit, test, lam, every=False):
    names = posterior_parameters(ft.model, "lora", True)
    la = fit_laplace(ft.model, names, fit, la_cfg, lam, len(ft.splits.train), ft.prior.means)
    blocks = glm.param_blocks(ft.model, la)
    table = glm.glm_pass(ft.model, la, blocks, test, ft.device)
    subsets = layer_subsets(num_blocks(ft.model))
    probs = {s: glm.probit_probs(table.logits, table.variances, b) for s, b in subsets.items()}
    if every:
        split = attribution.Split(table.logits, table.variances, table.labels)  # chosen and reported on test
        attribution.attribution(split, split, n_bins=15, n_bootstrap=0, n_permutations=2, seed=0)
    return probs


NAIVE_CHUNK = 32  # images per laplace-torch predictive call


def naive(ft, la_cfg, fit, test, lam, pred_type):
    """Per subset: only its parameters trainable, a fresh Laplace, fit, predict (the user's loop)."""
    import laplace

    names = set(posterior_parameters(ft.model, "lora", True))
    saved = {n: p.requires_grad for n, p in ft.model.named_parameters()}
    probs = {}
    torch.manual_seed(0)  # la(x, pred_type="nn") draws from the global generator
    for name, blocks in layer_subsets(num_blocks(ft.model)).items():
        chosen = [n for n, p in ft.model.named_parameters() if n in names and block_index(n) in blocks]
        for n, p in ft.model.named_parameters():
            p.requires_grad_(n in chosen)
        mean = torch.cat([ft.prior.means[n].reshape(-1) for n in chosen])
        la = laplace.Laplace(
            ft.model,
            "classification",
            subset_of_weights="all",
            hessian_structure="diag",
            prior_precision=lam,
            prior_mean=mean,
            backend=backend_class(la_cfg.curvature),
            temperature=len(fit.dataset) / len(ft.splits.train),
        )
        la.fit(fit, progress_bar=False)
        kw = (
            {"link_approx": "probit"}
            if pred_type == "glm"
            else {"link_approx": "mc", "n_samples": la_cfg.n_samples}
        )
        # laplace-torch's GLM Jacobians of a whole batch need ~23 GB at 256 images: chunks that fit
        chunks = [c for x, _ in test for c in x.split(NAIVE_CHUNK)]
        probs[name] = torch.cat([la(c, pred_type=pred_type, **kw).float().cpu() for c in chunks])
    for n, p in ft.model.named_parameters():
        p.requires_grad_(saved[n])
    return probs


def engine_nn(ft, la_cfg, fit, test, lam):
    post = build_posterior(
        ft.model,
        "lora",
        fit,
        la_cfg,
        prior_precision=lam,
        seed=0,
        n_train=len(ft.splits.train),
        prior_mean=ft.prior.means,
    )
    runner = ViTSuffix.try_build(ft.model, next(iter(test))[0][:2])
    return {
        s: nn_predictive(ft.model, post, b, test, ft.device, runner)[0].mean(0)
        for s, b in layer_subsets(num_blocks(ft.model)).items()
    }


def measure(fn, device, *args, **kw):
    with PeakMemory(device) as m:
        out = fn(*args, **kw)
    return out, m


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=30, help="posterior samples K of the nn comparison")
    parser.add_argument("--prior-precision", type=float, default=100.0)
    parser.add_argument("--backend", choices=list(BACKENDS), default="exact", help="both sides' curvature")
    parser.add_argument(
        "--lbfgs-steps",
        type=int,
        help="regime mode with this cap on L-BFGS steps (default: the sweep's posthoc theta-hat); both "
        "sides share the model either way",
    )
    args = parser.parse_args()
    torch.set_num_threads(len(psutil.Process().cpu_affinity()))
    ft, la_cfg, fit, test = setup(args)
    lam, dev = args.prior_precision, ft.device
    print(
        f"model: {ft.cfg.backbone.name}, {ft.tuned.trainable:,} tuned params, {num_blocks(ft.model)} blocks; "
        f"fit {len(fit.dataset)} / test {len(test.dataset)} examples; diag {la_cfg.curvature}; λ={lam:g}; "
        f"K={args.samples}; {torch.get_num_threads()} threads; device {dev}"
    )
    a, ma = measure(engine_glm, dev, ft, la_cfg, fit, test, lam)
    _, mall = measure(engine_glm, dev, ft, la_cfg, fit, test, lam, every=True)
    b, mb = measure(naive, dev, ft, la_cfg, fit, test, lam, "glm")
    diff = max((a[s] - b[s]).abs().max().item() for s in a)
    an, man = measure(engine_nn, dev, ft, la_cfg, fit, test, lam)
    bn, mbn = measure(naive, dev, ft, la_cfg, fit, test, lam, "nn")
    lines = {
        "glm": (
            mb.seconds / ma.seconds,
            ma,
            mb,
            f"max |p_A - p_B| = {diff:.1e} (target <= 1e-5), target >= 20x",
        ),
        "glm_all": (
            mall.seconds / ma.seconds,
            mall,
            ma,
            "all coalitions + Shapley vs the 10 subsets (target <= 2x)",
        ),
        "nn": (mbn.seconds / man.seconds, man, mbn, "no target (both sides run K forward passes per subset)"),
    }
    for name, (ratio, x, y, note) in lines.items():
        print(
            f"{name:8} {ratio:5.1f}x   A {x.seconds:7.1f} s {x.gib:5.2f} GiB   B {y.seconds:7.1f} s "
            f"{y.gib:5.2f} GiB   {note}"
        )
    figures = {
        n: {"ratio": r, "a_s": x.seconds, "a_peak_gib": x.gib, "b_s": y.seconds, "b_peak_gib": y.gib}
        for n, (r, x, y, _) in lines.items()
    } | {"glm_max_abs_prob_diff": diff, "map_stationarity": ft.train.stationarity}
    print(f"written: {write_benchmark('layerwise_eval', vars(args), figures)}")


if __name__ == "__main__":
    main()
