"""The kinds of sweep (``SweepConfig.kind``): what a trial of each kind runs, which of its metrics the
sweep prints, shows and summarises, and the commands printed for it.

:data:`KINDS` holds one frozen :class:`SweepKind` per kind; the driver, the progress view and the study
read it, so adding a kind is one entry here (and its trainable in :mod:`distlap.sweep.trainable`). A
kind whose Laplace stage is optional (``peft_methods`` with ``laplace: false``) has no ``bayes/*``
metrics; its :attr:`SweepKind.laplace_keys` are left out of every list then.

Light on purpose: the report reads these lists without torch, so the trainable is named here and
imported only in the worker, when a trial starts (:func:`trainable`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distlap import names

if TYPE_CHECKING:
    from distlap.sweep.settings import SweepConfig


@dataclass(frozen=True)
class SweepKind:
    """One kind of sweep. Metric lists are keys of :mod:`distlap.names`, in the order they appear."""

    name: str  # the value of SweepConfig.kind; its script is sweeps/<name>.py
    trainable: str  # the Ray Tune function trainable: a function of distlap.sweep.trainable
    printed: tuple[str, ...]  # the table printed at the sweep's end (after status and searched settings)
    shown: tuple[str, ...]  # after the objective: the MLflow runs table's columns (the shared view)
    summarised: tuple[str, ...]  # summary.csv's metric columns, and the sweep run's best/* metrics
    report: str  # the analysis script that writes this kind's report
    laplace_keys: frozenset[str] = frozenset()  # reported only with the sweep's `laplace: true`

    def present(self, keys: tuple[str, ...], cfg: SweepConfig) -> list[str]:
        """``keys`` that trials of ``cfg`` report (without ``laplace``: no :attr:`laplace_keys`)."""
        return [k for k in keys if cfg.laplace or k not in self.laplace_keys]

    @property
    def command(self) -> str:
        """How a person runs this kind's sweep (printed, never opened by the library)."""
        return f"python sweeps/{self.name}.py"


_MAP = (names.score("map", "val", "nll"), *(names.score("map", "test", s) for s in ("accuracy", "ece")))
_BAYES = (
    names.score("bayes", "val", "nll"),
    names.score("bayes", "test", "accuracy"),
    names.score("bayes", "test", "ece"),
    names.delta("bayes", "test", "ece"),
)
_COSTS = (names.TUNED_PARAMS_PCT, names.TIME_PER_EPOCH, names.WALL_TIME)
_SUBSET_DELTA = names.delta("subset", "test", "ece")
_MAP_TEST = (names.score("map", "test", "accuracy"), names.score("map", "test", "ece"))
_PEFT_COLUMNS = (
    *_MAP_TEST,
    names.delta("bayes", "test", "ece"),
    names.TUNED_PARAMS_PCT,
    names.TIME_PER_EPOCH,
)

LAYERWISE = SweepKind(
    name="layerwise",
    trainable="layerwise_trial",
    printed=(
        names.OBJECTIVE,
        names.score("bayes", "test", "ece"),
        names.delta("bayes", "test", "ece"),
        names.BEST_SUBSET,
    ),
    shown=(
        *_MAP_TEST,
        names.delta("bayes", "test", "ece"),
        names.score("subset", "test", "accuracy"),
        _SUBSET_DELTA,
        *names.interval(_SUBSET_DELTA),
    ),
    summarised=(*_MAP, *_BAYES, names.BEST_SUBSET, names.PRIOR_PRECISION, *_COSTS),
    report="analysis/report.py",
)
PEFT_METHODS = SweepKind(
    name="peft_methods",
    trainable="peft_methods_trial",
    printed=_PEFT_COLUMNS,
    shown=_PEFT_COLUMNS,
    summarised=(
        *_MAP,
        names.score("map", "test", "nll"),
        names.score("map", "test", "brier"),
        *_BAYES,
        names.TUNED_PARAMS,
        *_COSTS,
    ),
    report="analysis/peft_methods.py",
    laplace_keys=frozenset(_BAYES),
)
KINDS: dict[str, SweepKind] = {kind.name: kind for kind in (LAYERWISE, PEFT_METHODS)}


def kind_of(cfg: SweepConfig) -> SweepKind:
    return KINDS[cfg.kind]


def trainable(cfg: SweepConfig) -> Callable[[dict, SweepConfig], None]:
    """The Ray Tune function trainable of ``cfg``'s kind (``trainable(config, sweep)``): a stand-in with
    its name that imports the trial code (torch, transformers, peft, laplace-torch) in the worker when
    the trial starts, so that the driver never loads it (laplace-torch alone is ~4 s of CPU per start)."""
    name = kind_of(cfg).trainable

    def trial(config: dict, sweep: SweepConfig) -> None:
        from distlap.sweep import trainable as trainables  # in the worker: the trial code

        return getattr(trainables, name)(config, sweep)

    trial.__name__ = trial.__qualname__ = name  # Tune names the trials after it: <name>_<id>
    return trial


def printed_metrics(cfg: SweepConfig) -> list[str]:
    """The metric columns of the table the sweep prints when it ends."""
    kind = kind_of(cfg)
    return kind.present(kind.printed, cfg)


def key_metrics(cfg: SweepConfig) -> list[str]:
    """The metrics a person compares first: the objective, then the kind's :attr:`SweepKind.shown`."""
    kind = kind_of(cfg)
    return [cfg.search.metric, *kind.present(kind.shown, cfg)]


def summary_metrics(cfg: SweepConfig) -> tuple[str, ...]:
    """The trial metrics of ``summary.csv`` (and the sweep run's ``best/*``) for this kind of sweep."""
    kind = kind_of(cfg)
    return tuple(kind.present(kind.summarised, cfg))


def resume_command(cfg: SweepConfig) -> str:
    """The command that continues this sweep, quoted for a shell."""
    return f"{kind_of(cfg).command} --resume --output {shlex.quote(str(cfg.out))}"


def report_command(cfg: SweepConfig) -> str:
    """The command that writes this sweep's report again, quoted for a shell."""
    return f"python {kind_of(cfg).report} {shlex.quote(str(cfg.out))}"
