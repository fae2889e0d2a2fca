import dataclasses
import math

import matplotlib.image as mpimg
import torch

from distlap import metrics
from distlap.plots import reliability_diagram, reliability_figure


def _bins(n_bins=10):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, generator=g), dim=-1)
    labels = torch.randint(0, 4, (200,), generator=g)
    return dataclasses.asdict(metrics.reliability_bins(probs, labels, n_bins))


def test_bars_are_the_accuracy_of_the_non_empty_bins():
    bins = _bins()
    fig = reliability_figure(bins, "MAP", ece=0.1234)
    ax, hist = fig.axes
    accuracy_bars = list(ax.containers[0])
    filled = [(a, n) for a, n in zip(bins["accuracy"], bins["count"]) if n]
    assert any(n == 0 for n in bins["count"])  # the test needs an empty bin
    assert len(accuracy_bars) == len(filled)  # empty bins are not drawn
    assert [b.get_height() for b in accuracy_bars] == [a for a, _ in filled]
    assert [b.get_height() for b in hist.containers[0]] == [n for _, n in filled]
    gaps = [b.get_height() for b in ax.containers[1]]
    conf = [c for c, n in zip(bins["confidence"], bins["count"]) if n]
    assert all(math.isclose(g, c - a) for g, c, (a, _) in zip(gaps, conf, filled))
    assert ax.get_title() == "MAP\nECE 0.1234"


def test_saved_png_has_the_documented_size(tmp_path):
    path = reliability_diagram(_bins(), "Laplace on a subset with a long name", tmp_path / "a" / "r.png")
    assert mpimg.imread(path).shape[:2] == (520, 420)


def test_no_examples_at_all_still_draws():
    bins = _bins()
    bins["count"] = [0] * len(bins["count"])
    fig = reliability_figure(bins, "empty")
    assert len(fig.axes[0].containers[0]) == 0
