"""summary.csv: the study's trials joined with each trial's trial_result.json."""

import json

import optuna

from distlap import names
from distlap.sweep.kinds import summary_metrics
from distlap.sweep.search import distribution
from distlap.sweep.settings import SweepConfig, resolve
from distlap.sweep.study import load_study, storage, summarize


def _sweep(tmp_path) -> SweepConfig:
    return resolve(SweepConfig(output_dir=str(tmp_path), search={"num_samples": 3}))


def test_summary_joins_the_study_and_the_trial_files(tmp_path):
    cfg = _sweep(tmp_path)
    study = optuna.create_study(study_name=cfg.search.study_name, storage=storage(cfg.search.storage))
    dists = {k: distribution(p) for k, p in cfg.search.space.items()}
    states = {
        "a": (optuna.trial.TrialState.COMPLETE, 0.5),
        "b": (optuna.trial.TrialState.FAIL, None),
        "c": (optuna.trial.TrialState.RUNNING, None),
    }
    for tid, (state, value) in states.items():
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.prior_precision": 2.0, "peft.rank": 4},
                distributions=dists,
                state=state,
                value=value,
                user_attrs={
                    names.TRIAL_TAG: tid,
                    names.RUN_ID: f"run-{tid}",
                    **({names.ERROR: "boom"} if tid == "b" else {}),
                },
            )
        )
    (tmp_path / names.TRIALS_DIR / "a").mkdir(parents=True)
    metrics = {names.score("map", "test", "ece"): 0.05, names.BEST_SUBSET: "layer_1", "not/in/summary": 1}
    (tmp_path / names.TRIALS_DIR / "a" / names.TRIAL_FILE).write_text(json.dumps({"metrics": metrics}))
    summary = summarize(cfg)
    assert list(summary[names.STATUS]) == ["ok", "failed", "unfinished"]
    assert list(summary[names.TRIAL_ID]) == ["a", "b", "c"]
    assert list(summary.columns) == [
        names.OPTUNA_TRIAL,
        names.TRIAL_ID,
        names.STATUS,
        *cfg.search.space,
        names.OBJECTIVE,
        *summary_metrics(cfg),
        names.RUN_ID,
        names.ERROR,
    ]
    assert summary[names.OBJECTIVE][0] == 0.5 and summary[names.ERROR][1] == "boom"
    assert (
        summary[names.score("map", "test", "ece")][0] == 0.05 and summary[names.BEST_SUBSET][0] == "layer_1"
    )
    assert load_study(cfg.search).trials[0].user_attrs[names.RUN_ID] == "run-a"


def test_an_empty_study_has_the_columns_already(tmp_path):
    cfg = _sweep(tmp_path)
    optuna.create_study(study_name=cfg.search.study_name, storage=storage(cfg.search.storage))
    summary = summarize(cfg)
    assert summary.empty and names.OBJECTIVE in summary.columns and names.STATUS in summary.columns
