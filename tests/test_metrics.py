"""distlap.metrics: hand-computed values, parity with torchmetrics / torch."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from distlap import metrics as M


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: extra intra-op threads only add wake-up latency on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_probs(n: int, c: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g), dim=1)  # (n, c)
    return probs, torch.randint(0, c, (n,), generator=g)


# ------------------------------------------------------------------------------------ hand-computed

# n_bins = 4: edges 0, .25, .5, .75, 1 (exact in binary). Bins are [lo, hi), the last one [.75, 1].
#   row  probs               y  conf  correct  bin
#   1    [.9, .05, .05]      0  .9    yes      [.75, 1)
#   2    [.8, .1, .1]        1  .8    no       [.75, 1)
#   3    [.5, .25, .25]      0  .5    yes      [.5, .75)   (exactly on an edge)
#   4    [.4, .35, .25]      2  .4    no       [.25, .5)
#   5    [1., 0., 0.]        0  1.    yes      [.75, 1]
#   6    [.6, .4, 0.]        1  .6    no       [.5, .75)
# ECE  = 1/6 |0 - .4| + 2/6 |.5 - .55| + 3/6 |2/3 - .9| = (.4 + .1 + .7) / 6 = 0.2
# MCE  = max(.4, .05, .7/3) = 0.4;  accuracy = 3/6
# NLL  = -(ln .9 + ln .1 + ln .5 + ln .25 + ln 1 + ln .4) / 6
# Brier: .015 + 1.46 + .375 + .845 + 0 + .72 = 3.415, / 6
HAND_PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],
        [0.8, 0.1, 0.1],
        [0.5, 0.25, 0.25],
        [0.4, 0.35, 0.25],
        [1.0, 0.0, 0.0],
        [0.6, 0.4, 0.0],
    ],
    dtype=torch.float64,
)
HAND_LABELS = torch.tensor([0, 1, 0, 2, 0, 1])


def test_hand_computed_values():
    assert M.accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(0.5)
    assert M.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.2)
    assert M.maximum_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.4)
    nll = -sum(math.log(p) for p in (0.9, 0.1, 0.5, 0.25, 1.0, 0.4)) / 6
    assert M.negative_log_likelihood(HAND_PROBS, HAND_LABELS) == pytest.approx(nll)
    assert M.brier_score(HAND_PROBS, HAND_LABELS) == pytest.approx(3.415 / 6)


def test_hand_computed_reliability_bins():
    # [.75, 1] holds rows 1, 2, 5.
    bins = M.reliability_bins(HAND_PROBS, HAND_LABELS, n_bins=4)
    assert bins.edges == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins.count == [0, 1, 2, 3]
    assert math.isnan(bins.confidence[0]) and math.isnan(bins.accuracy[0])
    assert bins.confidence[1:] == pytest.approx([0.4, 0.55, 0.9])
    assert bins.accuracy[1:] == pytest.approx([0.0, 0.5, 2 / 3])


def test_confidence_one_is_in_the_last_bin_unlike_torchmetrics():
    # Ours (Guo: last bin closed): |.5 - .975| = .475. torchmetrics 1.9 gives 1.0 a bin of its own:
    # 1/2 |1 - .95| + 1/2 |0 - 1| = .525. The one documented difference from the peer.
    probs, labels = torch.tensor([[0.95, 0.05], [1.0, 0.0]]), torch.tensor([0, 1])
    assert M.expected_calibration_error(probs, labels) == pytest.approx(0.475)
    assert multiclass_calibration_error(probs, labels, 2, n_bins=15).item() == pytest.approx(0.525)


def test_summarize_keys_and_values():
    out = M.summarize(HAND_PROBS, HAND_LABELS, n_bins=4)
    assert set(out) == {"accuracy", "ece", "mce", "nll", "brier"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["ece"] == pytest.approx(0.2) and out["brier"] == pytest.approx(3.415 / 6)


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [2, 10, 100])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_calibration_parity_with_torchmetrics(seed, c, n_bins):
    probs, labels = _random_probs(500, c, seed)
    for norm, ours in (("l1", M.expected_calibration_error), ("max", M.maximum_calibration_error)):
        ref = multiclass_calibration_error(probs, labels, c, n_bins=n_bins, norm=norm).item()
        assert ours(probs, labels, n_bins) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("c", [2, 10, 100])
def test_accuracy_and_nll_parity(seed, c):
    probs, labels = _random_probs(500, c, seed)
    ref_acc = multiclass_accuracy(probs, labels, c, average="micro").item()
    assert M.accuracy(probs, labels) == pytest.approx(ref_acc, abs=1e-6)
    ref_nll = F.nll_loss(probs.double().log(), labels).item()
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(ref_nll, rel=1e-9)


def _edge_probs(n_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows whose max is exactly an inner bin edge k/M (both as torchmetrics' float32 edge and as k/M
    in ``dtype``), plus 0.2 and 1/3; 40 classes so the edge value stays the max. No confidence is 1.0,
    where we deliberately differ from torchmetrics."""
    c = 40
    edges32 = torch.linspace(0, 1, n_bins + 1)[1:-1].tolist()
    exact = [k / n_bins for k in range(1, n_bins)]
    values = torch.tensor(edges32 + exact + [0.2, 1 / 3], dtype=dtype)
    rest = ((1 - values) / (c - 1))[:, None].expand(-1, c - 1)
    return torch.cat([values[:, None], rest], dim=1)  # (rows, c)


@pytest.mark.parametrize("n_bins", [1, 3, 5, 10, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bin_edges_parity_with_torchmetrics(n_bins, dtype):
    probs = _edge_probs(n_bins, dtype).repeat(4, 1)  # every edge case, correct and wrong
    labels = torch.randint(0, 2, (probs.shape[0],), generator=torch.Generator().manual_seed(n_bins))
    for norm, ours in (("l1", M.expected_calibration_error), ("max", M.maximum_calibration_error)):
        ref = multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=n_bins, norm=norm).item()
        assert ours(probs, labels, n_bins) == pytest.approx(ref, abs=1e-6)


def test_brier_matches_naive_double_loop():
    probs, labels = _random_probs(200, 7, seed=3)
    naive = sum(
        sum((p - (c == y)) ** 2 for c, p in enumerate(row)) for row, y in zip(probs.tolist(), labels.tolist())
    ) / len(labels)
    assert M.brier_score(probs, labels) == pytest.approx(naive, rel=1e-6)


# ---------------------------------------------------------------------------------- reliability bins


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_reliability_bins_reproduce_ece(n_bins):
    probs, labels = _random_probs(500, 10, seed=4)  # no confidence is exactly 1.0 here
    bins = M.reliability_bins(probs, labels, n_bins)
    n = len(labels)
    assert len(bins.edges) == n_bins + 1 and len(bins.count) == n_bins
    assert sum(bins.count) == n
    ece = sum(k / n * abs(a - c) for k, a, c in zip(bins.count, bins.accuracy, bins.confidence) if k)
    assert ece == pytest.approx(M.expected_calibration_error(probs, labels, n_bins), abs=1e-12)
    json.dumps(dataclasses.asdict(bins))


def test_reliability_bins_count_confidence_one():
    one = torch.tensor([[1.0] + [0.0] * 39] * 3)
    probs = torch.cat([_edge_probs(15, torch.float32), one])  # plus rows with confidence exactly 1.0
    labels = torch.arange(len(probs)) % 2
    bins = M.reliability_bins(probs, labels)
    assert sum(bins.count) == len(probs) and bins.count[-1] == 5  # 14/15 twice, 1.0 three times
    n = len(labels)
    ece = sum(k / n * abs(a - c) for k, a, c in zip(bins.count, bins.accuracy, bins.confidence) if k)
    assert ece == pytest.approx(M.expected_calibration_error(probs, labels), abs=1e-12)


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), "2-D"),
        (torch.full((4, 2), 0.5), torch.zeros(3, dtype=torch.long), r"shape \(N,\)"),
        (torch.empty(0, 3), torch.empty(0, dtype=torch.long), "empty"),
        (torch.full((4, 2), 0.5), torch.tensor([0, 1, 2, 0]), r"labels must lie in \[0, 1\]"),
        (torch.full((4, 2), 0.5), torch.tensor([0, -1, 1, 0]), "labels must lie"),
        (torch.full((4, 2), 0.5), torch.zeros(4), "integer"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "probabilities"),
    ],
)
def test_invalid_inputs_raise(probs, labels, match):
    for metric in (M.accuracy, M.expected_calibration_error, M.summarize, M.reliability_bins):
        with pytest.raises(ValueError, match=match):
            metric(probs, labels)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5])
def test_invalid_n_bins_raise(n_bins):
    for metric in (M.expected_calibration_error, M.maximum_calibration_error, M.reliability_bins):
        with pytest.raises(ValueError, match="n_bins"):
            metric(HAND_PROBS, HAND_LABELS, n_bins)


def test_stacked_scores_are_the_scalar_metrics_of_each_row():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(4, 60, 7, generator=g), -1)  # (S, N, C)
    labels = torch.randint(0, 7, (60,), generator=g)
    scores = M.stacked_scores(probs, labels, n_bins=10)
    for s in range(4):
        assert scores["ece"][s].item() == M.expected_calibration_error(probs[s], labels, 10)
        assert scores["nll"][s].item() == pytest.approx(
            M.negative_log_likelihood(probs[s], labels), abs=1e-12
        )
        assert scores["accuracy"][s].item() == M.accuracy(probs[s], labels)
