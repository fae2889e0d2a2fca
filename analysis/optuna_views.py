"""Optuna's own views of the study (``optuna.visualization.matplotlib``), saved like the other figures.

A view that the study cannot support yet is not drawn; :func:`optuna_figures` returns the reason
instead of a path (too few finished trials, a parameter that never varied), so a small or partial
sweep still gets its report.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import optuna.visualization.matplotlib as ovm
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

from analysis.figures import save
from distlap.names import LAMBDA, LORA_RANK, SEED

MIN_IMPORTANCE_TRIALS = 4  # fANOVA on fewer finished trials ranks noise
MIN_CONTOUR_TRIALS = 3  # two points only draw the interpolation between them
CONTOUR_PARAMS = (LAMBDA, LORA_RANK)


def optuna_figures(study: optuna.Study | None, metric: str, out: Path) -> dict[str, Path | str]:
    """``optuna_history`` / ``optuna_importances`` / ``optuna_contour`` -> the PNG, or why it is absent."""
    if study is None:
        return dict.fromkeys(
            ("optuna_history", "optuna_importances", "optuna_contour"), "the Optuna study could not be read"
        )
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [p for p in _params(done) if len({repr(t.params.get(p)) for t in done}) > 1]
    settings = [p for p in varied if p != SEED]  # a contour over the seed would draw noise
    contour = list(CONTOUR_PARAMS) if set(CONTOUR_PARAMS) <= set(settings) else settings[:2]
    views = {
        "optuna_history": (
            lambda: _integer_x(ovm.plot_optimization_history(study, target_name=metric)),
            None if done else "no trial has finished yet",
            f"Optuna optimisation history ({metric}, validation)",
        ),
        "optuna_importances": (
            lambda: ovm.plot_param_importances(study, target_name=metric),
            _need(done, MIN_IMPORTANCE_TRIALS, varied, 1),
            f"Parameter importances for {metric} (fANOVA)",
        ),
        "optuna_contour": (
            lambda: ovm.plot_contour(study, params=contour, target_name=metric),
            _need(done, MIN_CONTOUR_TRIALS, contour, 2),
            f"{metric} over {' × '.join(contour) or 'two parameters'} (dots: trials)",
        ),
    }
    return {
        name: reason or _draw(plot, title, out / f"{name}.png")
        for name, (plot, reason, title) in views.items()
    }


def _params(trials) -> list[str]:
    return list(dict.fromkeys(p for t in trials for p in t.params))


def _integer_x(ax):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
    return ax


def _need(done, n_trials: int, params: list[str], n_params: int) -> str | None:
    if len(done) < n_trials:
        return f"needs at least {n_trials} finished trials (has {len(done)})"
    if len(params) < n_params:
        return f"needs {n_params} searched parameter(s) that took more than one value (has {len(params)})"
    return None


def _draw(plot, title: str, path: Path) -> Path | str:
    """Draw with Optuna, retitle, save; an Optuna refusal becomes the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning on every matplotlib view
            ax = plot()
    except (ValueError, RuntimeError) as err:
        return f"Optuna could not draw it: {err}"
    first = ax.flat[0] if hasattr(ax, "flat") else ax
    for loc in ("left", "right"):  # Optuna titles some views on the left
        first.set_title("", loc=loc)
    first.set_title(title)
    return save(first.figure, path)
