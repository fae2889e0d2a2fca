"""The GLM study against independent laplace-torch refits, one per subset.

Peer: for each subset S a NEW laplace-torch ``Laplace(..., subset_of_weights="all", hessian_structure=
"diag")`` with laplace-torch's own Curvlinops GGN, in which only S's LoRA tensors are trainable (same fit
data, temperature and prior mean as the study's fit, which uses distlap's exact GGN backend), and its
predictive ``la_S(x, pred_type="glm", link_approx="probit")`` at a given λ. Expected values are computed
here from those predictives: each λ_S is the argmin over the grid of their validation NLL (written out
below), the marglik λ a maximum of laplace-torch's own ``log_marginal_likelihood``, every row's
probabilities those of the refit at the chosen λ, and the best sets the argmax of the validation Δ of
the refits' predictives.
"""

from types import SimpleNamespace

import pytest
import torch
from laplace_peer import CPU, fit, inputs, loader, lora_model, lora_names, refit

from distlap import metrics, names
from distlap.bayes import glm_study as G
from distlap.bayes.posterior import GRID
from distlap.config import LaplaceConfig

SUBSETS = {f"layer_{b}": (b,) for b in range(4)} | {"ends": (0, 3), "all": (0, 1, 2, 3)}
FIXED = 3.0  # off the grid
CANDIDATES = [*GRID.tolist(), FIXED]  # what a validation grid search may choose from


def _labelled(n: int, seed: int):
    """n inputs whose labels are drawn from the model's softmax at temperature 2 (the MAP is over-
    confident): the validation NLL of the probit predictive then has interior minima in λ."""
    dl = loader(n=n, seed=seed, batch_size=20)
    with torch.no_grad():
        z = lora_model()(inputs(dl))
    y = torch.multinomial((z / 2).softmax(-1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
    return loader(n=n, seed=seed, batch_size=20, labels=y)


def _jacobians_once(la):
    """laplace-torch's own Jacobians of each batch, computed on its first use: they do not depend on λ,
    and ``la(x, ...)`` at every λ of the grid would otherwise recompute them (seconds each)."""
    real, memo = la.backend.jacobians, {}

    def jacobians(x, enable_backprop=False):
        if id(x) not in memo:
            memo[id(x)] = (x, real(x, enable_backprop))  # x kept: its id stays unique
        return memo[id(x)][1]

    la.backend.jacobians = jacobians
    return la


class Peer:
    """Refits per subset and their predictives on the study's splits, cached by (subset, split, λ)."""

    def __init__(self, model, splits):
        self.model, self.cache = model, {}
        self.splits = {name: list(dl) for name, dl in splits.items()}  # the same batch tensors every time
        self.refits = {
            name: _jacobians_once(refit(model, "diag", "curvlinops", s)) for name, s in SUBSETS.items()
        }

    def probs(self, name: str, split: str, lam: float) -> torch.Tensor:
        key = (name, split, float(torch.tensor(lam, dtype=torch.float32)))
        if key not in self.cache:
            la = self.refits[name]
            la.prior_precision = float(lam)
            self.cache[key] = torch.cat(
                [la(x, pred_type="glm", link_approx="probit").detach() for x, _ in self.splits[split]]
            )
        return self.cache[key]

    def labels(self, split: str) -> torch.Tensor:
        return torch.cat([y for _, y in self.splits[split]])

    def nll(self, name: str, split: str, lam: float) -> float:
        """-1/N sum_i log p(y_i | x_i), written out (the reference of the grid search)."""
        p = self.probs(name, split, lam).double()
        return -p[torch.arange(len(p)), self.labels(split)].log().mean().item()

    def map_probs(self, split: str) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inputs(self.splits[split])).softmax(-1)


@pytest.fixture(scope="module")
def peer():
    model = lora_model()
    return Peer(model, {"val": _labelled(60, 3), "test": _labelled(40, 4)})


@pytest.fixture(scope="module")
def study_fit(peer):
    return fit(peer.model, lora_names(peer.model), "diag", "exact")


def _run(peer, la, method, monkeypatch):
    """The study under ``method``, with the probabilities each row was scored on captured."""
    seen = {}
    real = G.subset_row

    def capture(blocks, val_probs, test_probs, ref, **kw):
        seen[tuple(blocks)] = (val_probs, test_probs)
        return real(blocks, val_probs, test_probs, ref, **kw)

    monkeypatch.setattr(G, "subset_row", capture)
    data = SimpleNamespace(model=peer.model, val=peer.splits["val"], test=peer.splits["test"], device=CPU)
    cfg = LaplaceConfig(prior_method=method, shapley_bootstrap=0)
    scoring = SimpleNamespace(n_bins=10, n_bootstrap=20, seed=0)
    study = G.glm_study(data, cfg, la, SUBSETS, scoring, prior_precision=FIXED, log=lambda m: None)
    return study, seen


def _grid_argmin(peer, name) -> tuple[float, float]:
    """λ_S by brute force over the candidates, and the NLL gap to the runner-up (ties would be moot)."""
    curve = sorted((peer.nll(name, "val", lam), lam) for lam in CANDIDATES)
    return curve[0][1], curve[1][0] - curve[0][0]


def _is_evidence_maximum(la, lam: float) -> bool:
    """laplace-torch's own evidence is larger at ``lam`` than 5% to either side."""
    at = [la.log_marginal_likelihood(torch.tensor(lam * f)).item() for f in (1 / 1.05, 1.0, 1.05)]
    return at[1] > max(at[0], at[2])


def _expected_global(peer, method) -> float | None:
    return {"fixed": FIXED, "gridsearch": _grid_argmin(peer, "all")[0], "marglik": None}[method]


@pytest.mark.slow  # six laplace-torch refits and their Jacobians: ~30 s in all
def test_each_subsets_own_lambdas_are_the_refits(peer, study_fit, monkeypatch):
    study, _ = _run(peer, study_fit, "fixed", monkeypatch)
    interior = 0
    for name in SUBSETS:
        m = study["rows"][name]["metrics"]
        best, gap = _grid_argmin(peer, name)
        assert gap > 1e-5, name  # the grid's NLL separates the winner from the runner-up
        assert m[names.SUBSET_LAMBDA_VAL] == pytest.approx(best, rel=1e-6), name
        interior += CANDIDATES[0] < best < CANDIDATES[-2]
        assert _is_evidence_maximum(peer.refits[name], m[names.SUBSET_LAMBDA_MARGLIK]), name
    assert interior >= 4  # most minima are interior: the test would see a shifted grid


@pytest.mark.slow  # six laplace-torch refits and their Jacobians: ~30 s in all
@pytest.mark.parametrize("method", ["fixed", "gridsearch", "marglik"])
def test_rows_are_the_refits_predictive_at_exactly_the_global_lambda(peer, study_fit, method, monkeypatch):
    """Validation and test rows (hence ``bayes/val/*``) at the chosen λ itself: with marglik a λ off the
    grid, where the nearest grid point's predictive is visibly different."""
    study, seen = _run(peer, study_fit, method, monkeypatch)
    lam = study["prior_precision"]
    expected = _expected_global(peer, method)
    if expected is None:  # marglik: a maximum of laplace-torch's evidence of the 'all' refit, off the grid
        assert _is_evidence_maximum(peer.refits["all"], lam)
        nearest = min(CANDIDATES, key=lambda g: abs(torch.tensor(g / lam).log().item()))
        assert abs(torch.tensor(nearest / lam).log().item()) > 0.05
        gap = (peer.probs("all", "val", nearest) - peer.probs("all", "val", lam)).abs().max()
        assert gap > 1e-4  # scoring at the nearest grid point would fail the check below
    else:
        assert lam == pytest.approx(expected, rel=1e-6)
    for name, subset in SUBSETS.items():
        val_probs, test_probs = seen[subset]
        torch.testing.assert_close(val_probs, peer.probs(name, "val", lam), rtol=0, atol=1e-5)
        torch.testing.assert_close(test_probs, peer.probs(name, "test", lam), rtol=0, atol=1e-5)
        m = study["rows"][name]["metrics"]
        assert m[names.score("subset", "val", "nll")] == pytest.approx(peer.nll(name, "val", lam), abs=1e-5)
        own = m[names.SUBSET_LAMBDA_VAL]
        tuned = m[names.score("subset_tuned", "test", "nll")]
        assert tuned == pytest.approx(peer.nll(name, "test", own), abs=1e-5)
    ref = study["reference"]
    torch.testing.assert_close(ref.val_probs, peer.map_probs("val"), rtol=0, atol=1e-6)
    torch.testing.assert_close(ref.test_probs, peer.map_probs("test"), rtol=0, atol=1e-6)


def _delta(peer, name, split, score, lam) -> float:
    """score(MAP) - score(refit predictive of ``name`` at ``lam``) on ``split``."""
    f = {
        "nll": metrics.negative_log_likelihood,
        "ece": lambda p, y: metrics.expected_calibration_error(p, y, 10),
    }
    y = peer.labels(split)
    return f[score](peer.map_probs(split), y) - f[score](peer.probs(name, split, lam), y)


@pytest.mark.slow  # six laplace-torch refits and their Jacobians: ~30 s in all
@pytest.mark.parametrize("method", ["fixed", "marglik"])
def test_best_blocks_are_chosen_on_validation_and_reported_on_test(peer, study_fit, method, monkeypatch):
    study, _ = _run(peer, study_fit, method, monkeypatch)
    lam = study["prior_precision"]
    for score in ("nll", "ece"):
        entry = study["attribution"]["values"][score]
        on_val = {b: _delta(peer, f"layer_{b}", "val", score, lam) for b in range(4)}
        ranked = sorted(on_val, key=on_val.get, reverse=True)
        assert on_val[ranked[0]] - on_val[ranked[1]] > 1e-4  # a clear winner on validation
        for key in ("best_sets", "greedy"):
            first = entry[key][0]
            assert tuple(first["blocks"]) == (ranked[0],) and first["size"] == 1
            assert first["val_value"] == pytest.approx(on_val[ranked[0]], abs=1e-5)
            assert first["value"] == pytest.approx(
                _delta(peer, f"layer_{ranked[0]}", "test", score, lam), abs=1e-5
            )
            last = entry[key][-1]
            assert tuple(last["blocks"]) == (0, 1, 2, 3)
            assert last["value"] == pytest.approx(_delta(peer, "all", "test", score, lam), abs=1e-5)
        row = study["rows"][f"layer_{ranked[0]}"]["metrics"]
        assert row[names.delta("subset", "val", score)] == pytest.approx(on_val[ranked[0]], abs=1e-5)
        assert sum(entry["shapley"]) == pytest.approx(_delta(peer, "all", "test", score, lam), abs=1e-5)


def test_a_lambda_is_looked_up_exactly_or_not_at_all():
    grid = torch.tensor([0.01, 10.0, 12.129402433201781, 31.6], dtype=torch.float32)
    assert G.lambda_index(grid, 12.129402433201781) == 2  # a float64 λ finds its fp32 self
    with pytest.raises(ValueError, match="lambda 12 was not evaluated"):
        G.lambda_index(grid, 12.0)  # never the nearest point
    with pytest.raises(ValueError, match="prior_method must be"):
        G.global_lambda(None, "laplace", FIXED, 4)
