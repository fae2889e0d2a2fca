"""The report's opening finding from the trials' robustness records: survives, does not, or unmeasured."""

import pytest

from analysis.robustness import robustness_lines, robustness_summary
from distlap import names


def _trial(tau, top=True, group=True, before=0.9, after=0.3, change=0.02, steps=120):
    return {
        "robustness": {
            names.ROBUST_TAU: tau,
            names.ROBUST_TOP: top,
            names.ROBUST_GROUP: group,
            names.ROBUST_BEFORE: before,
            names.ROBUST_AFTER: after,
            names.ROBUST_MOVED: after <= before / 2,
            names.ROBUST_CHANGE: change,
            names.ROBUST_STEPS: steps,
        }
    }


def test_survives_when_every_seed_moved_and_agrees():
    s = robustness_summary([_trial(0.87), _trial(0.73), _trial(1.0, change=0.027)])
    assert s["verdict"] == "survives" and s["mean_tau"] == pytest.approx((0.87 + 0.73 + 1.0) / 3)
    assert s["max_delta_ece_change"] == 0.027 and s["n_moved"] == 3
    (line,) = robustness_lines(s)
    assert line.startswith("The ranking survives further optimisation toward the mode: τ = +0.87. Further ")
    assert "at least halved in 3 of 3 seeds" in line and "no Δ_ECE moved by more than 0.027" in line


@pytest.mark.parametrize(
    "trials",
    [
        [_trial(0.9), _trial(0.9, top=False), _trial(0.9)],  # the top block changes in one seed
        [_trial(0.9), _trial(0.9, group=False), _trial(0.9)],  # the best group changes
        [_trial(0.2), _trial(0.4), _trial(0.5)],  # the order is scrambled
        [_trial(0.9), _trial(0.9, after=0.8), _trial(0.9)],  # one seed was not moved materially
    ],
)
def test_does_not_survive(trials):
    s = robustness_summary(trials)
    assert s["verdict"] == "does not survive"
    line = robustness_lines(s)[0]
    assert line.startswith("The ranking does NOT survive further optimisation")
    assert "not of the posterior. Further optimisation from θ̂ (" in line  # each sentence starts capitalised


def test_unmeasured_when_nothing_moved_and_absent_without_records():
    s = robustness_summary([_trial(0.9, after=0.8), _trial(0.1, after=0.7)])
    assert s["verdict"] == "unmeasured"
    assert "unmeasured" in robustness_lines(s)[0] and "raise train.refine_steps" in robustness_lines(s)[0]
    assert robustness_summary([{"subsets": {}}]) is None and robustness_lines(None) == []
