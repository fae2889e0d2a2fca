"""The exact GGN diagonal (distlap.curvature.ExactDiagGGN) against a naive per-example Jacobian
reference and against laplace-torch's Curvlinops backend (a peer implementation)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from distlap.bayes.curvature import ExactDiagGGN
from distlap.bayes.posterior import fit_laplace, posterior_parameters
from distlap.config import LaplaceConfig
from helpers import loader, lora_model


def naive_ggn_diagonal(model, names, batches) -> torch.Tensor:
    """sum_n diag(J_n^T (diag(p_n) - p_n p_n^T) J_n), J_n the logits' Jacobian of example n alone."""
    named = dict(model.named_parameters())
    primals = {n: named[n].detach() for n in names}
    total = 0
    for x, _ in batches:
        for xn in x.split(1):
            f = lambda ps, xn=xn: functional_call(model, ps, (xn,))[0]
            jac = jacrev(f)(primals)
            logits = f(primals)
            J = torch.cat([jac[n].reshape(logits.numel(), -1) for n in names], dim=1)  # (C, P)
            p = torch.softmax(logits, dim=-1)
            total = total + torch.einsum("cp,cd,dp->p", J, torch.diag(p) - torch.outer(p, p), J)
    return total


@pytest.mark.parametrize("method", ["lora", "norm", "hybrid"])
def test_exact_diag_equals_the_naive_reference_and_curvlinops(method):
    """LoRA factors, LN-tuning layers and hybrid's LayerNorm copies (peft ModulesToSaveWrapper), summed
    over the ViT's tokens per example; two batches."""
    model = lora_model(method)
    names = posterior_parameters(model, method, include_norms=True)
    fits = {
        b: fit_laplace(
            model, names, loader(n=12), LaplaceConfig(backend=b, batch_size=6), prior_precision=1.0
        )
        for b in ("exact", "curvlinops")
    }
    reference = naive_ggn_diagonal(model, names, loader(n=12))
    torch.testing.assert_close(fits["exact"].H, reference, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fits["curvlinops"].H, reference, rtol=1e-4, atol=1e-7)
    assert reference.sum() > 0
    torch.testing.assert_close(torch.as_tensor(fits["exact"].loss), torch.as_tensor(fits["curvlinops"].loss))


def test_auto_backend_is_exact_for_diag_and_curvlinops_for_kron():
    assert LaplaceConfig().curvature == "exact"
    assert LaplaceConfig(hessian_structure="kron").curvature == "curvlinops"
    with pytest.raises(ValueError, match="backend=exact computes the GGN diagonal only"):
        LaplaceConfig(hessian_structure="kron", backend="exact")


def test_dense_layers_and_two_calls_per_forward():
    """A plain MLP whose hidden layer runs twice per forward (weight sharing): per-example gradients
    sum over both calls before squaring."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.hidden, self.norm, self.out = (
                nn.Linear(4, 6),
                nn.Linear(6, 6),
                nn.LayerNorm(6),
                nn.Linear(6, 3),
            )

        def forward(self, x):
            h = torch.tanh(self.hidden(torch.tanh(self.inp(x))))
            return self.out(self.norm(torch.tanh(self.hidden(h))))

    model = Twice()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    backend = ExactDiagGGN(model, "classification")
    loss, diag = backend.diag(x, y)
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(diag, naive_ggn_diagonal(model, names, [(x, y)]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y, reduction="sum").detach())


def test_unsupported_module_is_refused_with_the_alternative():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"0\.weight belongs to a Conv1d.*use laplace\.backend=curvlinops"):
        ExactDiagGGN(model, "classification")
