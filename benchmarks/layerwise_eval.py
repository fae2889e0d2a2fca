"""Layer-wise evaluation: distlap's engine (A) against the naive per-subset refit (B), side by side.

A: one laplace-torch fit, every subset's restricted posterior from shared samples, ``nn`` predictive
   running only the blocks from the subset's first block on.
B: for each subset, a fresh ``Laplace`` with only that subset trainable, ``fit``, then
   ``la(x, pred_type="nn", link_approx="mc", n_samples=K)`` over the test set.

Both use the same fine-tuned model, fit examples, test examples and K. A uses ``--backend`` (default
``exact``, the engine's own exact GGN diagonal); B is measured once per ``--naive-backend``: by default
with laplace-torch's default backend (``curvlinops``, also exact: the naive user's setup) and with the
engine's ``exact`` (the same curvature code on both sides). The ECEs cannot be identical
(the two draw different random numbers), so the script also runs A with a second seed and prints the
Monte-Carlo spread of ECE between seeds beside the largest |ECE_A - ECE_B|.

    python benchmarks/layerwise_eval.py                      # tiny ViT, Fashion-MNIST (CPU default)
    python benchmarks/layerwise_eval.py --vit-b16 --n-test 2000 --device cuda   # ViT-B/16, 100 classes
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from distlap import metrics
from distlap.bayes.layers import block_index, layer_subsets, num_blocks
from distlap.bayes.posterior import BACKENDS, backend_class, build_posterior, posterior_parameters
from distlap.bayes.predictive import ViTSuffix, nn_predictive
from distlap.config import LaplaceConfig, PeftConfig, load_config
from distlap.provenance import write_benchmark


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated CUDA memory over a ``with`` block, in GiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            proc = psutil.Process()
            self._thread = threading.Thread(target=self._poll, args=(proc,), daemon=True)
            self._thread.start()
        self.start = time.perf_counter()
        return self

    def _poll(self, proc):
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.gib = self.peak / 2**30


def tiny_setup(args):
    """Fine-tune the embedded default (capped) once; both sides use this model and data."""
    from distlap.finetune.run import fine_tune

    cfg = load_config(
        overrides=[
            f"data.max_train={args.n_train}",
            f"data.max_test={args.n_test}",
            "train.epochs=2",
            f"train.prior_precision={args.prior_precision}",
        ]
    )
    ft = fine_tune(cfg, log=lambda m: None)
    test = ft.loader("test", batch_size=args.batch_size)
    fit = ft.loader("train", batch_size=32, max_examples=args.fit_examples)
    return ft.model, fit, test, ft.device, len(ft.splits.train)


def vit_b16_setup(args):
    """ViT-B/16 at 224x224, 100 classes, random weights and data: the seed's GPU-scale shapes."""
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import ViTConfig, ViTForImageClassification

    from distlap.finetune.adapters import apply_peft
    from distlap.finetune.train import LogitsModel

    torch.manual_seed(0)
    model = LogitsModel(
        apply_peft(
            ViTForImageClassification(ViTConfig(num_labels=100)), PeftConfig(method="lora", rank=16, alpha=16)
        )
    )
    with torch.no_grad():  # LoRA B = 0 at init would make every Jacobian of A vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    device = torch.device(args.device)

    def data(n):
        return TensorDataset(torch.randn(n, 3, 224, 224), torch.randint(0, 100, (n,)))

    test = DataLoader(data(args.n_test), batch_size=args.batch_size)
    return model.to(device), DataLoader(data(args.fit_examples), batch_size=16), test, device, 50_000


def engine(model, fit_loader, test, device, la_cfg, subsets, seed, n_train, lam):
    post = build_posterior(model, "lora", fit_loader, la_cfg, prior_precision=lam, seed=seed, n_train=n_train)
    runner = ViTSuffix.try_build(model, next(iter(test))[0][:2].to(device))
    eces = {}
    for name, blocks in subsets.items():
        probs, labels = nn_predictive(model, post, blocks, test, device, runner)
        eces[name] = metrics.expected_calibration_error(probs, labels)
    return eces


def naive(model, fit_loader, test, device, la_cfg, subsets, seed, n_train, lam):
    """What a user without the engine writes: per subset, freeze all but S, fit, predict."""
    import laplace

    names = set(posterior_parameters(model, "lora", True))
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    eces = {}
    torch.manual_seed(seed)  # la(x, pred_type="nn") draws from the global generator
    for name, blocks in subsets.items():
        for n, p in model.named_parameters():
            p.requires_grad_(n in names and block_index(n) in blocks)
        la = laplace.Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure=la_cfg.hessian_structure,
            prior_precision=lam,
            temperature=len(fit_loader.dataset) / n_train,
            backend=backend_class(la_cfg.backend),
        )
        la.fit(fit_loader)
        probs, labels = [], []
        for x, y in test:
            probs.append(
                la(x.to(device), pred_type="nn", link_approx="mc", n_samples=la_cfg.n_samples).float().cpu()
            )
            labels.append(y)
        eces[name] = metrics.expected_calibration_error(torch.cat(probs), torch.cat(labels))
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    return eces


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-b16", action="store_true", help="ViT-B/16-sized random backbone, 100 classes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=30, help="posterior samples K (both sides)")
    parser.add_argument("--n-train", type=int, default=3000, help="tiny: fine-tuning examples")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--fit-examples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--prior-precision", type=float, default=100.0)
    parser.add_argument("--structure", choices=["diag", "kron"], default="diag")
    parser.add_argument("--backend", choices=list(BACKENDS), default="exact", help="A's curvature backend")
    parser.add_argument(
        "--naive-backend",
        choices=list(BACKENDS),
        nargs="+",
        default=["curvlinops", "exact"],
        help="B's curvature backends, each measured (curvlinops = laplace-torch's default)",
    )
    args = parser.parse_args()
    torch.set_num_threads(len(psutil.Process().cpu_affinity()))

    model, fit_loader, test, device, n_train = (vit_b16_setup if args.vit_b16 else tiny_setup)(args)
    subsets = layer_subsets(num_blocks(model))
    print(
        f"model: {'ViT-B/16 (random), 100 classes' if args.vit_b16 else 'vit-tiny-fmnist, 5 classes'}; "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} tuned params; device {device}; "
        f"{len(subsets)} subsets; K={args.samples}; fit {len(fit_loader.dataset)} / test "
        f"{len(test.dataset)} examples; {args.structure}; lambda={args.prior_precision:g}; "
        f"{torch.get_num_threads()} threads"
    )
    lam = args.prior_precision

    def cfg(backend: str) -> LaplaceConfig:
        return LaplaceConfig(
            hessian_structure=args.structure,
            backend=backend,
            n_samples=args.samples,
            fit_examples=args.fit_examples,
            batch_size=16 if args.vit_b16 else 32,
        )

    with PeakMemory(device) as a:
        ece_a = engine(model, fit_loader, test, device, cfg(args.backend), subsets, 0, n_train, lam)
    b, ece_b = {}, {}
    for backend in args.naive_backend:
        with PeakMemory(device) as b[backend]:
            ece_b[backend] = naive(model, fit_loader, test, device, cfg(backend), subsets, 0, n_train, lam)
    ece_a2 = engine(model, fit_loader, test, device, cfg(args.backend), subsets, 1, n_train, lam)

    print(
        f"{'subset':>9}  {'ECE A':>8}  "
        + "  ".join(f"{'ECE B ' + n:>16}" for n in b)
        + f"  {'ECE A seed 1':>12}"
    )
    for k in subsets:
        print(
            f"{k:>9}  {ece_a[k]:8.4f}  "
            + "  ".join(f"{ece_b[n][k]:16.4f}" for n in b)
            + f"  {ece_a2[k]:12.4f}"
        )
    print(f"A (distlap engine, {args.backend + ')':11} {a.seconds:8.1f} s   peak memory {a.gib:.2f} GiB")
    for name, run in b.items():
        diff = max(abs(ece_a[k] - ece_b[name][k]) for k in subsets)
        print(
            f"B (naive refit, {name + ')':14} {run.seconds:8.1f} s   peak memory {run.gib:.2f} GiB   "
            f"B/A = {run.seconds / a.seconds:.2f}x   max |ECE_A - ECE_B| = {diff:.4f}"
        )
    spread = max(abs(ece_a[k] - ece_a2[k]) for k in subsets)
    print(f"Monte-Carlo spread of ECE (A, seed 0 vs seed 1, max over subsets): {spread:.4f}")
    figures = {
        "a_seconds": a.seconds,
        "a_peak_gib": a.gib,
        "mc_spread_ece": spread,
        **{f"b_{n}_seconds": r.seconds for n, r in b.items()},
        **{f"b_{n}_peak_gib": r.gib for n, r in b.items()},
        **{f"ratio_b_{n}_over_a": r.seconds / a.seconds for n, r in b.items()},
    }
    print(f"written: {write_benchmark('layerwise_eval', vars(args), figures)}")


if __name__ == "__main__":
    main()
