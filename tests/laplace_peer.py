"""A LoRA tiny ViT and independent laplace-torch fits over chosen parameters: the peer the GLM engine,
the per-subset prior and the Shapley values are checked against (tests/bayes/). Importable as
``from laplace_peer import ...`` (pytest puts ``tests/`` on the path)."""

import laplace
import torch
from torch.utils.data import DataLoader, TensorDataset

from distlap.bayes.layers import block_index
from distlap.bayes.posterior import backend_class
from distlap.config import PeftConfig
from distlap.finetune.adapters import apply_peft
from distlap.finetune.train import LogitsModel
from helpers import make_tiny_vit

CPU = torch.device("cpu")
CONFIGS = [("diag", "exact"), ("diag", "curvlinops"), ("kron", "curvlinops")]
SUBSETS = [(1,), (0, 2), (0, 1, 2, 3)]  # a single block, a group, all
PRIOR, TEMPERATURE = 0.5, 2.0  # temperature 2: a tempered (flatter) likelihood


def lora_model():
    torch.manual_seed(0)
    model = LogitsModel(apply_peft(make_tiny_vit(num_labels=3, layers=4), PeftConfig(method="lora", rank=2)))
    with torch.no_grad():  # move LoRA B off zero so the GGN of A is not degenerate
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
            if "classifier" in name:  # confident logits, so that the probit link visibly flattens them
                p.mul_(10.0)
    return model.eval()


def loader(n=48, seed=0, batch_size=16, labels=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 3, (n,), generator=g) if labels is None else labels
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def lora_names(model):
    return [n for n, p in model.named_parameters() if "lora_" in n]


def prior_mean_of(model, names):
    """A non-zero prior mean per parameter (seeded), to exercise laplace-torch's ``prior_mean``."""
    g = torch.Generator().manual_seed(7)
    named = dict(model.named_parameters())
    return {n: 0.01 * torch.randn(named[n].numel(), generator=g) for n in names}


def fit(
    model,
    names,
    structure,
    backend,
    prior_mean=None,
    prior_precision=PRIOR,
    temperature=TEMPERATURE,
    data=None,
):
    """A fresh laplace-torch fit over exactly ``names`` on ``data`` (default :func:`loader`), with
    requires_grad restored afterwards."""
    chosen = set(names)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    try:
        order = [n for n, _ in model.named_parameters() if n in chosen]  # laplace-torch's flat order
        mean = 0.0 if prior_mean is None else torch.cat([prior_mean[n] for n in order])
        la = laplace.Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure=structure,
            backend=backend_class(backend),
            prior_precision=prior_precision,
            prior_mean=mean,
            temperature=temperature,
        )
        la.fit(loader() if data is None else data, progress_bar=False)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return la


def refit(model, structure, backend, subset, prior_mean=None):
    names = [n for n in lora_names(model) if block_index(n) in subset]
    return fit(model, names, structure, backend, prior_mean)


def inputs(dl):
    return torch.cat([x for x, _ in dl])
