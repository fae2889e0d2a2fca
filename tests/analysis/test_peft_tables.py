"""The PEFT-methods report's parts on synthetic trial frames: tables, trends and figures (numbers checked
by hand or against numpy). The whole report on a sweep folder: tests/analysis/test_peft_report.py."""

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd

from analysis.peft_figures import (
    accuracy_per_param_figure,
    accuracy_vs_params_figure,
    ece_vs_params_figure,
    time_per_epoch_figure,
    write_figures,
)
from analysis.peft_methods import RANKING_NOTE, trends
from analysis.peft_tables import (
    ACC,
    COLUMNS,
    ECE,
    MAP,
    TRIAL_COLUMNS,
    consolidated_tables,
    method_summary,
    numeric_tables,
    setting_file,
    table_captions,
)
from distlap.names import METHOD

A = ("org/vit-tiny", "cifar10", 1)
B = ("org/vit-small", "cifar100", 10)
TITLE_A, TITLE_B = "vit-tiny (CIFAR-10, 1 epoch)", "vit-small (CIFAR-100, 10 epochs)"
# (method, setting, seed, accuracy, ece, tuned params %, time per epoch)
ROWS_A = [
    ("norm", A, 0, 0.940, 0.050, 0.20, 10.0),
    ("norm", A, 1, 0.950, 0.070, 0.20, 12.0),
    ("lora", A, 0, 0.960, 0.070, 5.0, 15.0),
    ("lora", A, 1, 0.962, 0.074, 5.0, 16.0),
    ("hybrid", A, 0, 0.930, 0.080, 0.19, 11.0),
    ("hybrid", A, 1, 0.932, 0.082, 0.19, 11.5),
]
ROWS_B = [
    ("norm", B, 0, 0.893, 0.048, 0.27, 1524.0),
    ("lora", B, 0, 0.908, 0.060, 2.82, 2011.0),
    ("hybrid", B, 0, 0.880, 0.070, 0.26, 1848.0),
]
FIGURE_PX = (450, 800)  # analysis.figures.save: 8 x 4.5 in at 100 dpi (height, width)


def frame(rows, status="ok") -> pd.DataFrame:
    """A load_peft_trials-like frame (hybrid first, to check the tables reorder)."""
    out = [
        {
            "trial_id": f"t{i}",
            "status": status,
            METHOD: m,
            "backbone.name": s[0],
            "data.dataset": s[1],
            "train.epochs": s[2],
            "seed": seed,
            ACC: acc,
            ECE: ece,
            MAP["nll"]: 0.3,
            MAP["brier"]: 0.1,
            "tuned_params": 100,
            "tuned_params_pct": pct,
            "time_per_epoch_s": t,
        }
        for i, (m, s, seed, acc, ece, pct, t) in enumerate(rows)
    ]
    trials = pd.DataFrame(out, columns=TRIAL_COLUMNS)
    return trials.sort_values(METHOD, kind="stable").reset_index(drop=True)


# --- tables --------------------------------------------------------------------------------------


def test_tables_have_exactly_the_five_columns_and_method_order():
    tables = consolidated_tables(frame(ROWS_A + ROWS_B))
    assert list(tables) == [(A[0], A[1]), (B[0], B[1])]
    for table in tables.values():
        assert list(table.columns) == COLUMNS
        assert COLUMNS == ["Method", "Tuned Params %", "Acc@1", "ECE", "Time/Epoch (s)"]
        assert list(table["Method"]) == ["Norm", "LoRA", "Hybrid"]


def test_cells_are_mean_and_sample_std_over_seeds():
    trials = frame(ROWS_A)
    table = consolidated_tables(trials)[(A[0], A[1])].set_index("Method")
    norm = trials[trials[METHOD] == "norm"]
    acc, ece = 100 * norm[ACC].to_numpy(), norm[ECE].to_numpy()
    assert table.loc["Norm", "Acc@1"] == f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}%" == "94.50 ± 0.71%"
    assert table.loc["Norm", "ECE"] == f"{ece.mean():.3f} ± {ece.std(ddof=1):.3f}" == "0.060 ± 0.014"
    assert table.loc["LoRA", "Tuned Params %"] == "5.00 ± 0.00"
    assert table.loc["Hybrid", "Time/Epoch (s)"] == "11.2 ± 0.4"  # 3 significant digits of the smallest mean
    num = numeric_tables(trials)[(A[0], A[1])].set_index("Method")
    np.testing.assert_allclose(
        num.loc["Norm", ["Acc@1", "Acc@1_std"]].astype(float), [acc.mean(), acc.std(ddof=1)]
    )
    np.testing.assert_allclose(num.loc["LoRA", "Acc@1 / Tuned Params %"], np.mean([96.0 / 5, 96.2 / 5]))
    assert num.loc["Norm", "n_seeds"] == 2 and num.loc["Norm", "seeds"] == "0, 1"


def test_one_seed_shows_no_std_and_csv_layout():
    trials = frame(ROWS_B)
    table = consolidated_tables(trials)[(B[0], B[1])]
    assert table.iloc[0].tolist() == ["Norm", "0.27", "89.30%", "0.048", "1524"]
    num = numeric_tables(trials)[(B[0], B[1])]
    assert list(num.columns[:11]) == [
        "Method",
        "n_seeds",
        "seeds",
        "Tuned Params %",
        "Tuned Params %_std",
        "Acc@1",
        "Acc@1_std",
        "ECE",
        "ECE_std",
        "Time/Epoch (s)",
        "Time/Epoch (s)_std",
    ]
    assert num["Acc@1_std"].isna().all()
    assert table_captions(trials)[(B[0], B[1])].startswith(f"{TITLE_B}: mean ± std over 1 seed (0)")


def test_only_present_methods_and_ok_trials():
    failed = frame([("hybrid", A, 0, math.nan, math.nan, 0.19, 11.0)], status="failed")
    trials = pd.concat([frame(ROWS_A[:4]), failed], ignore_index=True)
    table = consolidated_tables(trials)[(A[0], A[1])]
    assert list(table["Method"]) == ["Norm", "LoRA"]


def test_several_epochs_split_a_backbone_dataset_pair():
    five = [(m, (A[0], A[1], 5), seed, acc + 0.01, ece, pct, t) for m, _, seed, acc, ece, pct, t in ROWS_A]
    trials = frame(ROWS_A + five)
    keys = list(consolidated_tables(trials))
    assert keys == [(A[0], A[1], 1), (A[0], A[1], 5)]
    assert list(method_summary(trials).drop_duplicates("title")["title"]) == [
        TITLE_A,
        "vit-tiny (CIFAR-10, 5 epochs)",
    ]
    assert setting_file(keys[1]) == "table_org-vit-tiny_cifar10_5ep.csv"
    assert (
        setting_file(("google/vit-base-patch16-224", "fashion_mnist"))
        == "table_google-vit-base-patch16-224_fashion-mnist.csv"
    )


# --- trends --------------------------------------------------------------------------------------

WINNERS_A = (
    f"{TITLE_A}: highest accuracy LoRA (96.10% vs 94.50% for Norm, 1.60 pp higher, above the seed "
    "std of 0.71 pp); lowest ECE Norm (0.060 vs 0.072 for LoRA, 0.012 lower, within seed noise, "
    "std 0.014)."
)


def test_trends_consistent_rankings():
    assert trends(frame(ROWS_A + ROWS_B)) == [
        WINNERS_A,
        f"{TITLE_B}: highest accuracy LoRA (90.80% vs 89.30% for Norm, 1.50 pp higher, one seed, noise not "
        "measured); lowest ECE Norm (0.048 vs 0.060 for LoRA, 0.012 lower, one seed, noise not measured).",
        # one seed in B: no order there is beyond noise, so nothing contradicts A's
        f"Accuracy ranking: LoRA > Norm > Hybrid in {TITLE_A}; LoRA ≈ Norm ≈ Hybrid in {TITLE_B}; "
        "no order is reversed beyond seed noise between settings.",
        # A: Norm 0.060 ± 0.014 vs LoRA 0.072 ± 0.003 is within noise; LoRA vs Hybrid 0.081 ± 0.001 is not
        f"ECE ranking (lowest first): Norm ≈ LoRA < Hybrid in {TITLE_A}; Norm ≈ LoRA ≈ Hybrid in {TITLE_B}; "
        "no order is reversed beyond seed noise between settings.",
        RANKING_NOTE,
        "Tuned Params % per method across settings: Norm 0.20–0.27%, LoRA 2.82–5.00%, Hybrid 0.19–0.26%.",
        # Acc@1 / % per trial, then the mean: Hybrid 93.1/0.19 = 490.0 and 88.0/0.26 = 338.5
        "Accuracy per tuned parameter (Acc@1 points per Tuned Params %) is highest for Hybrid in every "
        "setting: Norm 330.7–472.5, LoRA 19.2–32.2, Hybrid 338.5–490.0.",
    ]


def test_trends_inconsistent_ranking():
    """Two seeds in B, Norm clearly ahead of LoRA there and clearly behind in A: a reversal, named."""
    rows_b = [
        (m, B, seed, acc + d, ece, pct, t)
        for m, acc, ece, pct, t in (
            ("norm", 0.915, 0.048, 0.27, 1524.0),
            ("lora", 0.908, 0.060, 2.82, 2011.0),
        )
        for seed, d in ((0, 0.0), (1, 0.002))
    ]
    lines = trends(frame(ROWS_A + rows_b))
    assert lines[2] == (
        f"Accuracy ranking differs across settings: LoRA > Norm > Hybrid in {TITLE_A}; "
        f"Norm > LoRA in {TITLE_B} (LoRA ahead of Norm in {TITLE_A}, behind in {TITLE_B})."
    )
    assert lines[1].startswith(f"{TITLE_B}: highest accuracy Norm (91.60% vs 90.90% for LoRA, 0.70 pp higher")


def test_rankings_follow_the_intervals_not_the_point_estimates():
    """A tie, or a gap within the seed std, is never ranked with '>': the winners line and the ranking
    say the same thing (the issue's "tied ... then LoRA > Hybrid")."""
    tied = [
        ("lora", A, 0, 0.37, 0.06, 5.0, 1.0),
        ("hybrid", A, 0, 0.37, 0.07, 6.0, 1.0),
        ("norm", A, 0, 0.33, 0.05, 1.0, 1.0),
    ]
    lines = trends(frame(tied))
    assert "accuracy tied between LoRA and Hybrid (37.00%)" in lines[0]
    assert "accuracy ranking LoRA ≈ Hybrid ≈ Norm" in lines[1]  # one seed: no gap is beyond noise
    two_seeds = [
        (m, A, s, acc + 0.001 * s, ece, pct, t) for m, _, _, acc, ece, pct, t in tied for s in (0, 1)
    ]
    lines = trends(frame(two_seeds))
    assert "accuracy ranking LoRA ≈ Hybrid > Norm" in lines[1]  # 4 points apart, std 0.07 points
    assert lines[2] == RANKING_NOTE


def test_trends_one_setting():
    assert trends(frame(ROWS_A)) == [
        WINNERS_A,
        f"Only one setting ({TITLE_A}): accuracy ranking LoRA > Norm > Hybrid, ECE ranking (lowest first) "
        "Norm ≈ LoRA < Hybrid; no cross-setting comparison.",
        RANKING_NOTE,
        "Tuned Params % per method: Norm 0.20%, LoRA 5.00%, Hybrid 0.19%.",
        f"Accuracy per tuned parameter (Acc@1 points per Tuned Params %) is highest for Hybrid in {TITLE_A}: "
        "Norm 472.5, LoRA 19.2, Hybrid 490.0.",
    ]


def test_trends_one_method_and_accuracy_within_noise():
    only = trends(frame(ROWS_A[:2]))[0]
    assert only == f"{TITLE_A}: only Norm ran (Acc@1 94.50%, ECE 0.060); no comparison."
    close = [
        ("norm", A, 0, 0.950, 0.05, 0.2, 10.0),
        ("norm", A, 1, 0.960, 0.05, 0.2, 10.0),
        ("lora", A, 0, 0.955, 0.06, 5.0, 10.0),
        ("lora", A, 1, 0.957, 0.06, 5.0, 10.0),
    ]
    assert (
        "highest accuracy LoRA (95.60% vs 95.50% for Norm, 0.10 pp higher, within seed noise, std 0.71 pp)"
    ) in trends(frame(close))[0]


# --- figures -------------------------------------------------------------------------------------


def test_figures_plot_one_point_or_bar_per_setting_and_method(tmp_path):
    summary = method_summary(frame(ROWS_A + ROWS_B))
    for draw in (accuracy_vs_params_figure, ece_vs_params_figure):
        fig = draw(summary)
        assert [len(ax.containers) for ax in fig.axes] == [3, 3]  # one panel per dataset
        assert fig.axes[0].get_xscale() == "log"
        markers = [{c.lines[0].get_marker() for c in ax.containers} for ax in fig.axes]
        assert markers == [{"o"}, {"s"}]  # marker = backbone
    fig = accuracy_vs_params_figure(summary)
    np.testing.assert_allclose(
        sorted(c.lines[0].get_ydata()[0] for c in fig.axes[0].containers), [93.1, 94.5, 96.1]
    )
    for draw in (time_per_epoch_figure, accuracy_per_param_figure):
        assert [len(ax.patches) for ax in draw(summary).axes] == [3, 3]
    paths = write_figures(summary, tmp_path)
    assert sorted(paths) == [
        "accuracy_per_tuned_param",
        "accuracy_vs_tuned_params",
        "ece_vs_tuned_params",
        "time_per_epoch",
    ]
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(path).shape[:2] == FIGURE_PX
