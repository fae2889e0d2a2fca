"""Layer subsets of the ``nn`` predictive as Ray tasks in a trial's child bundles.

:func:`ray_nn_evaluator` returns the :data:`~distlap.bayes.layerwise.NNEvaluator` a sweep trial hands to
the layer-wise study: one Ray task per subset (model, posterior and data shared through the object
store, the loaders rebuilt in the task), results yielded as they finish. Each task asks for exactly one
child bundle of the trial's placement group, so ``resources.eval_tasks`` subsets run at once beside the
trial. The numbers equal the serial evaluation's: a subset is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ray
import torch

from distlap.bayes.evaluate import Reference
from distlap.bayes.layerwise import NNEvaluator, Scoring, Subsets, evaluate_nn_subset
from distlap.bayes.posterior import Posterior
from distlap.finetune.data import ImageTransform, make_loader
from distlap.finetune.run import FineTuned
from distlap.runtime import set_threads


@dataclass(frozen=True)
class _Job:
    """What every subset task of a trial shares besides the model, the posterior and the two data sets
    (those go through the object store as arguments of their own: Ray resolves only top-level refs)."""

    transform: ImageTransform | None
    ref: Reference  # the MAP's probabilities the subsets are compared with
    device: torch.device
    scoring: Scoring
    batch_size: int  # of the evaluation loaders
    threads: int  # torch threads: the CPUs of one child bundle


def _subset_task(model, posterior, val, test, job: _Job, blocks) -> dict:
    """Body of one Ray task: rebuild the loaders here and evaluate one subset."""
    set_threads(job.threads)
    loaders = [
        make_loader(ds, job.batch_size, shuffle=False, seed=0, transform=job.transform) for ds in (val, test)
    ]
    return evaluate_nn_subset(model, posterior, blocks, *loaders, job.ref, job.device, job.scoring)


def ray_nn_evaluator(ft: FineTuned, scoring: Scoring, task_resources: dict[str, float], log) -> NNEvaluator:
    """An evaluator that runs each subset as a Ray task with ``task_resources`` (num_cpus, num_gpus)."""
    resources = {"num_cpus": 1, **task_resources}
    device = torch.device("cuda" if resources.get("num_gpus") and torch.cuda.is_available() else "cpu")
    task = ray.remote(_subset_task).options(max_retries=3, retry_exceptions=False, **resources)

    def evaluate(posterior: Posterior, subsets: Subsets, ref: Reference) -> Iterator[tuple[str, dict]]:
        shared = [ray.put(obj) for obj in (ft.model.cpu(), posterior, ft.splits.val, ft.splits.test)]
        job = _Job(
            transform=ft.transform,
            ref=ref,
            device=device,
            scoring=scoring,
            batch_size=ft.cfg.laplace.eval_batch_size,
            threads=int(resources["num_cpus"]),
        )
        futures = {task.remote(*shared, job, blocks): name for name, blocks in subsets.items()}
        log(f"[distlap] evaluating {len(futures)} subsets as Ray tasks ({resources})")
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield futures[done[0]], ray.get(done[0])

    return evaluate
