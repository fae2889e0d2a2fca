"""Layer subsets of the ``nn`` predictive as Ray tasks in a trial's child bundles.

:func:`ray_nn_evaluator` returns the :data:`~distlap.bayes.layerwise.NNEvaluator` a sweep trial hands to
the layer-wise study: one Ray task per subset (model, posterior and data shared through the object
store, the loaders rebuilt in the task), results yielded as they finish. Each task asks for exactly one
child bundle of the trial's placement group, so ``resources.eval_tasks`` subsets run at once beside the
trial. The numbers equal the serial evaluation's: a subset is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import ray
import torch

from distlap.bayes.evaluate import Reference
from distlap.bayes.layerwise import NNEvaluator, Scoring, Subsets, evaluate_nn_subset
from distlap.bayes.posterior import Posterior
from distlap.finetune.data import make_loader
from distlap.finetune.run import FineTuned
from distlap.runtime import set_threads


def _subset_task(
    model, posterior, blocks, val, test, transform, ref, device, scoring, batch, threads
) -> dict:
    """Body of one Ray task: rebuild the loaders here and evaluate one subset."""
    set_threads(threads)
    loaders = [make_loader(ds, batch, shuffle=False, seed=0, transform=transform) for ds in (val, test)]
    return evaluate_nn_subset(model, posterior, blocks, *loaders, ref, device, scoring)


def ray_nn_evaluator(ft: FineTuned, scoring: Scoring, task_resources: dict[str, float], log) -> NNEvaluator:
    """An evaluator that runs each subset as a Ray task with ``task_resources`` (num_cpus, num_gpus)."""
    resources = {"num_cpus": 1, **task_resources}
    device = torch.device("cuda" if resources.get("num_gpus") and torch.cuda.is_available() else "cpu")
    task = ray.remote(_subset_task).options(max_retries=3, retry_exceptions=False, **resources)

    def evaluate(posterior: Posterior, subsets: Subsets, ref: Reference) -> Iterator[tuple[str, dict]]:
        shared = [ray.put(obj) for obj in (ft.model.cpu(), posterior, ft.splits.val, ft.splits.test)]
        futures = {
            task.remote(
                *shared[:2],
                blocks,
                *shared[2:],
                ft.transform,
                ref,
                device,
                scoring,
                ft.cfg.laplace.eval_batch_size,
                int(resources["num_cpus"]),
            ): name
            for name, blocks in subsets.items()
        }
        log(f"[distlap] evaluating {len(futures)} subsets as Ray tasks ({resources})")
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield futures[done[0]], ray.get(done[0])

    return evaluate
