"""A GLM pass over contiguous shards of the data, concatenated in the examples' order.

Each example's MAP logits and per-block variances depend on that example alone (the model in eval mode,
the posterior fixed), so for shards [0, n_1), [n_1, n_2), ..., [n_{k-1}, N) of a loader's data set
    pass(x_1..x_N) = concat_k pass(x_{n_{k-1}+1} .. x_{n_k})
up to the float rounding of other batch shapes. :func:`shard_bounds` cuts, :func:`shard_loader` rebuilds a
shard's loader (same batch size and collate, e.g. the image transform), :func:`concat_passes` joins;
:func:`sharded` is the in-process :data:`~distlap.bayes.glm.PassRunner` over shards (the sweep's Ray
runner, :mod:`distlap.sweep.glm_tasks`, runs each shard in its own task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from distlap.bayes.glm import GLMPass, PassRunner, PreparedPass, run_pass


def shard_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """min(k, n) contiguous [lo, hi) ranges covering range(n), sizes differing by at most one."""
    if k < 1:
        raise ValueError(f"shards: need k >= 1, got {k}")
    k = max(1, min(k, n))
    cuts = [i * n // k for i in range(k + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def check_sharding(loader: DataLoader) -> None:
    """Sharding keeps the serial pass's examples only for an unshuffled loader that keeps its last batch."""
    if not isinstance(loader.sampler, SequentialSampler) or loader.drop_last:
        raise ValueError("a sharded GLM pass needs an evaluation loader with shuffle=False, drop_last=False")


def shard_loader(dataset: Dataset, lo: int, hi: int, batch_size: int, collate: Callable | None) -> DataLoader:
    """Examples lo..hi-1 of ``dataset`` in order, batched and collated as the original loader."""
    shard = Subset(dataset, range(lo, hi))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate)


def concat_passes(parts: Sequence[GLMPass]) -> GLMPass:
    """The shards' passes joined along the examples: logits (N, C), variances (N, B, C) or (G, N, B, C)."""
    first = parts[0]
    axis = first.variances.dim() - 3  # the examples' axis
    return GLMPass(
        torch.cat([p.logits for p in parts]),
        torch.cat([p.variances for p in parts], dim=axis),
        torch.cat([p.labels for p in parts]),
        first.prior_precisions,
    )


def sharded(k: int, run: PassRunner = run_pass) -> PassRunner:
    """A runner that passes ``k`` contiguous shards one after another through ``run`` (in this process)."""

    def runner(model: nn.Module, prepared: PreparedPass, loader: DataLoader, device: torch.device) -> GLMPass:
        check_sharding(loader)
        data, size, collate = loader.dataset, loader.batch_size, loader.collate_fn
        bounds = shard_bounds(len(data), k)
        parts = [run(model, prepared, shard_loader(data, lo, hi, size, collate), device) for lo, hi in bounds]
        return concat_passes(parts)

    return runner
