"""One per-example Jacobian pass serves the linearised (GLM) predictive of every block subset.

Linearised predictive (Immer et al. 2021; Daxberger et al. 2021, "Laplace Redux"):
    f_lin(x; theta) = f(x; theta*) + J(x) (theta - theta*),   theta ~ N(theta*, Sigma),
so the logits are Gaussian with mean mu = f(x; theta*) and covariance J Sigma J^T. For diag and KFAC
posteriors Sigma is block-diagonal over parameter tensors t (hence over transformer blocks b), and the
restricted posterior of a subset S of blocks has logit covariance sum_{b in S} J_b Sigma_b J_b^T. The
pass keeps its diagonal per block, v_b(x)_c = sum_{t in b} J_{t,c} Sigma_t J_{t,c}^T:
    diag: Sigma_t = diag(1 / (factor h_t + lambda))     -> v = sum_p J_cp^2 / (factor h_p + lambda)
    kron: factor H_t = (Q1 x Q2) diag(factor l1 (x) l2) (Q1 x Q2)^T (laplace-torch's KronDecomposed)
          -> v = sum_ij (Q1^T J_c Q2)_ij^2 / (factor l1_i l2_j + lambda),  J_c reshaped like the weight
and the probit link (MacKay 1992) gives p_S(y | x) = softmax(mu / sqrt(1 + pi/8 sum_{b in S} v_b)).

Per-example Jacobian rows come from module hooks: for each class c one backward pass of sum_n f_nc gives
the gradient at every hooked module output, and a layer's per-example parameter gradient is a sum over
its tokens (``distlap.bayes.curvature.PER_EXAMPLE``): C backward passes per batch, memory bounded by the batch
(never N x C x P, never a Jacobian of a whole chunk).

The posterior side (:func:`prepare_pass`: each tensor's eigenbasis and inverse eigenvalues over the λ
grid, the tensors' names in the model and their blocks) is separate from the data pass (:func:`run_pass`),
which finds its tensors by name: a pass can run on a deserialised copy of the model (a Ray task), and a
:data:`PassRunner` decides how the data are passed (default :func:`run_pass`, in this process).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from laplace.baselaplace import DiagLaplace, KronLaplace
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distlap.bayes.curvature import PER_EXAMPLE
from distlap.bayes.layers import block_index
from distlap.metrics import stacked_scores

# (eigenbasis of Sigma_t: () = the identity, (Q,) or (Q1, Q2); inverse eigenvalues (G, numel))
Term = tuple[tuple[Tensor, ...], Tensor]


@dataclass
class GLMPass:
    """What one pass returns. ``variances`` is (N, B, C), or (G, N, B, C) over ``prior_precisions``."""

    logits: Tensor  # (N, C) fp32 MAP logits f(x; theta*)
    variances: Tensor  # (N, B, C) or (G, N, B, C): diag of J_b Sigma_b J_b^T
    labels: Tensor  # (N,)
    prior_precisions: Tensor | None  # (G,) the lambda grid, None = the Laplace object's own prior

    def at(self, g: int) -> Tensor:
        """Per-block variances (N, B, C) under grid point ``g``."""
        return self.variances if self.prior_precisions is None else self.variances[g]


def param_blocks(model: nn.Module, la) -> list[int]:
    """Transformer block of each of ``la.params``, in laplace-torch's flat order."""
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = [block_index(names[id(p)]) for p in la.params]
    if None in blocks:
        raise ValueError("every posterior parameter must lie inside a transformer block")
    return blocks


# ------------------------------------------------------------------------- posterior per tensor


def _diag_terms(la: DiagLaplace, prior_precisions: Tensor | None) -> list[Term]:
    """diag: Sigma_t = 1 / (factor h_t + lambda), per tensor (G, numel); the eigenbasis is the identity."""
    if prior_precisions is None:
        inv = (1 / la.posterior_precision)[None]  # (1, P), laplace-torch's own
    else:
        curv = la._H_factor * la.H  # (P,)
        inv = 1 / (curv[None] + prior_precisions[:, None].to(curv))  # (G, P)
    return [((), part) for part in inv.split([p.numel() for p in la.params], dim=1)]


def _kron_terms(la: KronLaplace, prior_precisions: Tensor | None) -> list[Term]:
    """kron: eigenbasis Q1 x Q2 (or Q) and inverse eigenvalues 1 / (factor l1 (x) l2 + lambda), (G, numel)."""
    if la.damping:
        raise ValueError("damped KFAC (damping=True) is not additive in lambda; fit with damping=False")
    decomposed = la.H * la._H_factor  # KronDecomposed, factor folded in
    if prior_precisions is None:
        deltas = la.posterior_precision.deltas.reshape(-1, 1)  # (T, 1), laplace-torch's own
    else:
        deltas = prior_precisions.to(decomposed.deltas).reshape(1, -1).expand(len(decomposed), -1)
    terms = []
    for Qs, ls, delta, p in zip(
        decomposed.eigenvectors, decomposed.eigenvalues, deltas, la.params, strict=True
    ):
        eig = torch.outer(ls[0], ls[1]).flatten() if len(ls) == 2 else ls[0]  # (numel,)
        if eig.numel() != p.numel():
            raise ValueError(f"Kronecker factors of size {eig.numel()} for a tensor of {p.numel()}")
        terms.append((tuple(Qs), torch.pow(eig[None] + delta[:, None], -1)))  # inv: (G, numel)
    return terms


def rotate(g: Tensor, basis: Sequence[Tensor]) -> Tensor:
    """Coordinates of per-example gradients (n, *shape) in the eigenbasis Q1 x Q2 (or Q, or the identity
    for ``()``): (n, numel)."""
    if not basis:
        return g.flatten(1)
    if len(basis) == 1:
        return g.flatten(1) @ basis[0].to(g)
    q1, q2 = basis
    return (q1.T.to(g) @ g.reshape(-1, len(q1), len(q2)) @ q2.to(g)).flatten(1)  # vec(Q1^T G Q2)


def posterior_terms(la, prior_precisions: Tensor | None = None) -> list[Term]:
    """Per parameter tensor of ``la`` (flat order): (Sigma_t's eigenbasis, inverse eigenvalues (G, numel)),
    so that J Sigma_t J^T = sum_k (rotate(J, basis))_k^2 inv_k for each grid point."""
    if isinstance(la, DiagLaplace):
        return _diag_terms(la, prior_precisions)
    if isinstance(la, KronLaplace):
        return _kron_terms(la, prior_precisions)
    raise ValueError(f"{type(la).__name__}: only DiagLaplace and KronLaplace are block-diagonal over tensors")


@dataclass(frozen=True)
class PreparedPass:
    """The posterior side of a pass: for each posterior tensor (laplace-torch's flat order) its name in
    the model, its transformer block and its :data:`Term`; ``grid`` the λ of the terms' rows (None: the
    Laplace object's own prior). Plain tensors and names: it pickles, apart from the model."""

    names: tuple[str, ...]
    blocks: tuple[int, ...]
    terms: tuple[Term, ...]
    grid: Tensor | None

    def to(self, device: torch.device) -> PreparedPass:
        """The same terms on ``device``."""
        terms = tuple((tuple(q.to(device) for q in basis), inv.to(device)) for basis, inv in self.terms)
        return PreparedPass(self.names, self.blocks, terms, self.grid)


def prepare_pass(
    model: nn.Module, la, blocks: Sequence[int], prior_precisions: Tensor | Sequence[float] | None = None
) -> PreparedPass:
    """:class:`PreparedPass` of ``la`` (posterior over tensors of ``model``) at ``prior_precisions``."""
    grid = None if prior_precisions is None else torch.as_tensor(prior_precisions, dtype=torch.float32)
    if len(blocks) != len(la.params):
        raise ValueError(f"{len(blocks)} block indices for {len(la.params)} posterior tensors")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(la.params) if id(p) not in names]
    if missing:
        raise ValueError(f"posterior tensors {missing} are not parameters of the model; fit la on it")
    terms = posterior_terms(la, grid)
    return PreparedPass(tuple(names[id(p)] for p in la.params), tuple(blocks), tuple(terms), grid)


# ------------------------------------------------------------------------------ the Jacobian pass


def _owners(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """The module that holds each named parameter directly, and its attribute name."""
    owners = []
    for name in names:
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        if type(module) not in PER_EXAMPLE:
            raise ValueError(
                f"{name} belongs to a {type(module).__name__}; the GLM pass covers "
                f"{', '.join(t.__name__ for t in PER_EXAMPLE)} only"
            )
        owners.append((module, attr))
    return owners


def _batch_variances(model, x, owners, terms, blocks, n_blocks) -> tuple[Tensor, Tensor]:
    """MAP logits (n, C) and per-block logit variances (G, n, B, C) of one batch."""
    modules = {id(m): m for m, _ in owners}
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0].detach(), out)))
        for m in modules.values()
    ]
    try:
        with torch.enable_grad():
            f = model(x)  # (n, C)
    finally:
        for h in hooks:
            h.remove()
    n, n_classes = f.shape
    out = f.new_zeros(terms[0][1].shape[0], n, n_blocks, n_classes)  # (G, n, B, C)
    for c in range(n_classes):
        grads = torch.autograd.grad(
            f[:, c].sum(), [o for *_, o in calls], retain_graph=c < n_classes - 1, materialize_grads=True
        )
        per_example: dict[tuple[int, str], Tensor] = {}
        for (module, a, _), g in zip(calls, grads, strict=True):
            for attr, value in PER_EXAMPLE[type(module)](a, g.detach(), module).items():
                key = (id(module), attr)  # modules called twice: sum
                per_example[key] = per_example[key] + value if key in per_example else value
        for (module, attr), (basis, inv), b in zip(owners, terms, blocks, strict=True):
            jac = per_example[(id(module), attr)]  # (n, *shape): row c of J_t
            coords = rotate(jac, basis)  # (n, numel)
            out[:, :, b, c] += (coords.pow(2) @ inv.T).T  # (G, n)
    return f.detach().float(), out.float()


def glm_pass(
    model: nn.Module,
    la,
    blocks: Sequence[int],
    loader: DataLoader,
    device: torch.device,
    prior_precisions: Tensor | Sequence[float] | None = None,
    run: PassRunner | None = None,
) -> GLMPass:
    """MAP logits and per-block GLM logit variances of every example of ``loader``, in one pass.

    ``la`` is a fitted laplace-torch DiagLaplace or KronLaplace over exactly the posterior parameters
    (its ``H``, likelihood factor / temperature ``_H_factor`` and, without a grid, its prior precision
    are used); ``blocks[i]`` is the transformer block of ``la.params[i]``. With ``prior_precisions``
    (G,) the variances are returned for each scalar lambda_g: (G, N, B, C). Runs in the dtype of the
    model and of ``la`` (fp32 in distlap; no autocast); logits and variances are returned in fp32.
    ``run`` passes the data (default :func:`run_pass`, in this process; the sweep's runs shards as
    Ray tasks); every runner returns the examples in ``loader``'s order.
    """
    prepared = prepare_pass(model, la, blocks, prior_precisions)
    return (run or run_pass)(model, prepared, loader, device)


def run_pass(model: nn.Module, prepared: PreparedPass, loader: DataLoader, device: torch.device) -> GLMPass:
    """The data side of :func:`glm_pass`: ``prepared``'s tensors found in ``model`` by name."""
    owners, n_blocks = _owners(model, prepared.names), max(prepared.blocks) + 1
    model.eval().to(device)
    terms = [(basis, inv.to(device)) for basis, inv in prepared.terms]
    logits, variances, labels = [], [], []
    with _graph_through(model, [model.get_parameter(n) for n in prepared.names]):
        for x, y in loader:
            f, v = _batch_variances(model, x.to(device), owners, terms, prepared.blocks, n_blocks)
            logits.append(f.cpu())
            variances.append(v.cpu())
            labels.append(y)
    v = torch.cat(variances, dim=1)  # (G, N, B, C)
    grid = prepared.grid
    return GLMPass(torch.cat(logits), v if grid is not None else v[0], torch.cat(labels), grid)


@contextmanager
def _graph_through(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Only ``params`` require grad inside (only the posterior's tensors build a graph); restored after."""
    chosen = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def batch_pass(
    model: nn.Module,
    names: Sequence[str],
    terms: Sequence[Term],
    blocks: Sequence[int],
    x: Tensor,
    n_blocks: int,
) -> tuple[Tensor, Tensor]:
    """MAP logits (n, C) and per-block logit variances (n, B, C), on the CPU, of one batch ``x`` under the
    posterior ``terms`` (one λ, G = 1) of the parameters ``names`` of ``model`` (``blocks[i]`` the block
    of ``names[i]``): :func:`run_pass` for one batch of a saved posterior
    (:mod:`distlap.bayes.glm_posterior`)."""
    model.eval()
    with _graph_through(model, [model.get_parameter(n) for n in names]):
        f, v = _batch_variances(model, x, _owners(model, names), list(terms), list(blocks), n_blocks)
    return f.cpu(), v[0].cpu()


# (model, prepared posterior, loader, the trial's device) -> the pass over the loader, in its order
PassRunner = Callable[[nn.Module, PreparedPass, DataLoader, torch.device], GLMPass]


# ------------------------------------------------------------------------- subsets of the table


def probit_probs(logits: Tensor, variances: Tensor, subset: Iterable[int]) -> Tensor:
    """softmax(mu / sqrt(1 + pi/8 sum_{b in S} v_b)), (N, C); the empty subset gives softmax(mu) exactly."""
    mask = torch.zeros(1, variances.shape[1], dtype=torch.bool)
    mask[0, list(subset)] = True
    return subset_probs(logits, variances, mask)[0]


def subset_probs(logits: Tensor, variances: Tensor, masks: Tensor) -> Tensor:
    """Probit probabilities of many subsets at once: masks (S, B) bool -> (S, N, C)."""
    n, b, c = variances.shape
    var = (masks.to(variances) @ variances.transpose(0, 1).reshape(b, n * c)).view(-1, n, c)  # (S, N, C)
    z = torch.div(logits, var.mul_(math.pi / 8).add_(1).sqrt_(), out=var)  # in place: mu / sqrt(1 + ...)
    return torch.softmax(z, dim=-1)


def subset_metrics(
    logits: Tensor, variances: Tensor, labels: Tensor, masks: Tensor, n_bins: int = 15, max_bytes: int = 2**28
) -> dict[str, Tensor]:
    """ECE, NLL and accuracy (float64, (S,) each) of the probit predictive of every mask (S, B).

    Exactly ``distlap.metrics`` on :func:`subset_probs` (same binning, NLL clamp at 1e-12), chunked over
    subsets so that one chunk's probabilities take at most ``max_bytes`` (peak about twice that).
    """
    n, _, c = variances.shape
    rows = max(1, max_bytes // (4 * n * c))
    out = {"ece": [], "nll": [], "accuracy": []}
    for chunk in masks.split(rows):
        scores = stacked_scores(subset_probs(logits, variances, chunk), labels, n_bins)  # (s,) each
        for key, value in scores.items():
            out[key].append(value)
    return {k: torch.cat(v) for k, v in out.items()}
