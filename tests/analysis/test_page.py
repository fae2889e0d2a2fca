"""The report page fits a laptop screen (tables scroll in their own box, long headers wrap, figures
shrink, long titles wrap) and a reliability diagram in the report draws nothing over an empty bin."""

import matplotlib.image as mpimg
import numpy as np
import pandas as pd

from analysis import figures, page
from distlap import names
from distlap.plots import reliability_figure

DELTA_LOW = names.interval(names.delta("subset", "test"))[0]


def test_tables_scroll_in_their_own_box_and_cells_are_escaped():
    table = pd.DataFrame({DELTA_LOW: [0.01], "error": ["<b>boom</b>"]})
    html = page.table_html(table)
    assert html.startswith('<div class="table">') and html.endswith("</div>")
    assert "subset/<wbr>test/<wbr>delta_<wbr>ece_<wbr>low" in html  # the header may wrap
    assert "&lt;b&gt;boom&lt;/b&gt;" in html and "<b>" not in html
    rendered = page.render("t", ["a finding"], [], [("caption", table)], [])
    assert (
        f"max-width: {page.MAX_WIDTH_PX}px" in rendered
        and ".table { max-width: 100%; overflow-x: auto" in rendered
    )
    assert "figure img { max-width: 100%" in rendered


def test_a_long_figure_title_is_wrapped(tmp_path):
    fig, ax = figures.plt.subplots()
    ax.set_title("Δ_ECE by layer subset, " + ", ".join(f"setting_{i}=value_{i}" for i in range(8)))
    figures.save(fig, tmp_path / "t.png")
    assert all(len(line) <= figures.TITLE_CHARS for line in ax.get_title().splitlines())
    assert len(ax.get_title().splitlines()) > 1


def _bins_with_an_empty_bin() -> dict:
    """Five bins of 0.2; the second (0.2-0.4) holds no example."""
    return {
        "edges": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        "accuracy": [0.1, 0.0, 0.5, 0.6, 0.9],
        "confidence": [0.15, 0.0, 0.5, 0.7, 0.95],
        "count": [5, 0, 20, 30, 45],
    }


def test_the_reports_reliability_diagram_draws_nothing_over_an_empty_bin(tmp_path):
    bins = _bins_with_an_empty_bin()
    result = {
        "map": {"reliability": bins, "metrics": {names.score("map", "test", "ece"): 0.05}},
        "subsets": {"all": {"reliability": bins, "metrics": {names.score("subset", "test", "ece"): 0.04}}},
    }
    paths = figures.reliability_set(result, None, "t1", tmp_path)
    assert sorted(paths) == ["reliability_all", "reliability_map"]
    image = mpimg.imread(paths["reliability_map"])[..., :3]
    fig = reliability_figure(bins, "MAP, trial t1", 0.05)  # the same layout, to find the bins' pixels
    fig.canvas.draw()
    ax = fig.axes[0]
    height = image.shape[0]
    (x0, y0), (_, y1) = ax.transData.transform([(0.0, 0.02), (0.0, 0.98)])
    rows = slice(int(height - y1), int(height - y0))

    def coloured(x: float) -> int:
        column = image[rows, int(ax.transData.transform((x, 0))[0])]
        return int((np.abs(column[:, 0] - column[:, 2]) > 0.3).sum())  # blue bar or red gap, not grey

    assert coloured(0.3) == 0  # the empty bin: no accuracy bar, no gap bar
    assert coloured(0.5) > 0 and coloured(0.9) > 0
