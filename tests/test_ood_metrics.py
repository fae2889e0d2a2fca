"""distlap.metrics OOD detection: AUROC (Mann-Whitney, ties as halves) and predictive entropy."""

import math

import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from distlap import metrics as M


def _sklearn_auroc(s_in, s_out):
    y = [1] * len(s_in) + [0] * len(s_out)
    return roc_auc_score(y, torch.cat([s_in, s_out]).double().numpy())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randint(0, 12, (300,), generator=g).double() + 2  # many ties, shifted up
    s_out = torch.randint(0, 12, (170 + seed,), generator=g).double()
    assert M.auroc(s_in, s_out) == pytest.approx(_sklearn_auroc(s_in, s_out), abs=1e-12)
    cont_in, cont_out = torch.randn(500, generator=g) + 0.5, torch.randn(250, generator=g)
    assert M.auroc(cont_in, cont_out) == pytest.approx(_sklearn_auroc(cont_in, cont_out), abs=1e-12)


def test_auroc_hand_cases():
    assert M.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert M.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert M.auroc(torch.ones(4), torch.ones(7)) == 0.5
    # pairs (in, out): (1,0) win, (1,1) tie, (1,2) loss, (3,*) win x3 -> (4 + 0.5) / 6
    assert M.auroc(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(4.5 / 6)


def test_auroc_equals_the_mann_whitney_u():
    g = torch.Generator().manual_seed(7)
    s_in = torch.randint(0, 5, (60,), generator=g).double()
    s_out = torch.randint(0, 5, (40,), generator=g).double()
    u = stats.mannwhitneyu(s_in.numpy(), s_out.numpy(), alternative="two-sided").statistic
    assert M.auroc(s_in, s_out) == pytest.approx(u / (60 * 40), abs=1e-12)


def test_predictive_entropy_values():
    probs = torch.tensor(
        [[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64
    )
    h = M.predictive_entropy(probs)
    assert h.dtype == torch.float64 and h.shape == (4,)
    assert h.tolist() == pytest.approx(
        [math.log(4), 0.0, math.log(2), stats.entropy([0.7, 0.1, 0.1, 0.1])], abs=1e-12
    )


def test_ood_aurocs_separate_confident_from_uniform():
    g = torch.Generator().manual_seed(0)
    confident = torch.softmax(6 * torch.randn(200, 5, generator=g), 1)
    flat = torch.softmax(0.3 * torch.randn(100, 5, generator=g), 1)
    out = M.ood_aurocs(confident, flat)
    assert set(out) == {"auroc_maxprob", "auroc_entropy"} and min(out.values()) > 0.95
    assert M.ood_aurocs(flat, confident)["auroc_maxprob"] < 0.05


@pytest.mark.parametrize(
    "scores_in, scores_out, match",
    [
        (torch.ones(3, 2), torch.ones(3), "scores_in"),
        (torch.ones(3), torch.tensor([]), "scores_out"),
        (torch.ones(3), torch.tensor([1.0, float("nan")]), "scores_out"),
    ],
)
def test_auroc_refuses_bad_scores(scores_in, scores_out, match):
    with pytest.raises(ValueError, match=match):
        M.auroc(scores_in, scores_out)


def test_predictive_entropy_refuses_bad_probs():
    with pytest.raises(ValueError, match="probs"):
        M.predictive_entropy(torch.ones(4))
