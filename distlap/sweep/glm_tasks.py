"""The GLM Jacobian pass as Ray tasks over contiguous shards of the data, in a trial's child bundles.

:func:`ray_glm_runner` returns the :data:`~distlap.bayes.glm.PassRunner` a sweep trial hands to the
layer-wise study (and so to its predictive on the shifted and OOD sets): each pass cuts its loader's
data set into ``resources.eval_tasks`` contiguous shards (:func:`~distlap.bayes.glm_shards.shard_bounds`),
runs each shard's pass in its own Ray task (model, prepared posterior and data set shared through the
object store, the shard's loader rebuilt in the task) and joins the results in the shards' order, so the
table (and every subset, coalition and Shapley value served from it) is the serial pass's, up to fp32
rounding of other batch shapes. Each task asks for exactly one child bundle (CPUs, or a GPU fraction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distlap.bayes.glm import GLMPass, PassRunner, PreparedPass, run_pass
from distlap.bayes.glm_shards import check_sharding, concat_passes, shard_bounds, shard_loader
from distlap.runtime import set_threads

CPU = torch.device("cpu")


@dataclass(frozen=True)
class _Shard:
    """One task's share of a pass: examples [lo, hi) of the data set, batched and collated as the trial's
    loader, on ``device`` with ``threads`` torch threads (the CPUs of one child bundle)."""

    lo: int
    hi: int
    batch_size: int
    collate: Callable | None
    device: torch.device
    threads: int


def _shard_task(model: nn.Module, prepared: PreparedPass, dataset: Dataset, shard: _Shard) -> GLMPass:
    """Body of one Ray task: the pass over one shard, on this task's copy of the model."""
    set_threads(shard.threads)
    loader = shard_loader(dataset, shard.lo, shard.hi, shard.batch_size, shard.collate)
    return run_pass(model, prepared, loader, shard.device)


def ray_glm_runner(tasks: int, task_resources: dict[str, float], log) -> PassRunner:
    """A runner that passes ``tasks`` contiguous shards as Ray tasks with ``task_resources``
    (num_cpus, num_gpus: one child bundle each); a data set of fewer examples gets one task per example."""
    resources = {"num_cpus": 1, **task_resources}
    device = torch.device("cuda" if resources.get("num_gpus") and torch.cuda.is_available() else "cpu")
    threads = max(1, int(resources["num_cpus"]))
    task = ray.remote(_shard_task).options(max_retries=3, retry_exceptions=False, **resources)

    def run(model: nn.Module, prepared: PreparedPass, loader: DataLoader, _device: torch.device) -> GLMPass:
        check_sharding(loader)
        bounds = shard_bounds(len(loader.dataset), tasks)
        shared = [ray.put(obj) for obj in (model.cpu(), prepared.to(CPU), loader.dataset)]
        futures = [
            task.remote(*shared, _Shard(lo, hi, loader.batch_size, loader.collate_fn, device, threads))
            for lo, hi in bounds
        ]
        count = f"{len(futures)} Ray task{'s' * (len(futures) > 1)}"
        log(f"[distlap] glm pass: {len(loader.dataset)} examples in {count} ({resources})")
        return concat_passes(ray.get(futures))  # in the shards' order, however they finished

    return run
