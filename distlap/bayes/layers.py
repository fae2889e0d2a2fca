"""Which parameters belong to which transformer block, and the layer subsets the study evaluates.

Block indices are derived from parameter names with one helper, for every naming transformers has
used for ViTs: 5.x ``vit.layers.N.attention.q_proj`` and 4.x ``vit.encoder.layer.N.attention.
attention.query`` (with or without peft's ``base_model.model.`` prefix).
"""

from __future__ import annotations

import re

import numpy as np
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers|blocks)\.(\d+)\.")


def block_index(param_name: str) -> int | None:
    """Transformer block of a parameter or module name, or None outside the blocks (embeddings, head)."""
    match = _BLOCK.search(param_name)
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    indices = {block_index(name) for name, _ in model.named_parameters()} - {None}
    if not indices:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}'s parameter names")
    return max(indices) + 1


def standard_subsets(n_blocks: int) -> dict[str, tuple[int, ...]]:
    """``layer_0 .. layer_{L-1}``, ``early`` / ``mid`` / ``late`` thirds and ``all``, in that order.

    Thirds follow ``numpy.array_split``: with L = 12 each holds four blocks; a remainder goes to the
    earlier groups (L = 4 -> (0, 1), (2,), (3,)).
    """
    if n_blocks < 3:
        raise ValueError(f"early/mid/late need at least 3 blocks, the model has {n_blocks}")
    subsets = {f"layer_{i}": (i,) for i in range(n_blocks)}
    for name, part in zip(("early", "mid", "late"), np.array_split(np.arange(n_blocks), 3)):
        subsets[name] = tuple(int(i) for i in part)
    subsets["all"] = tuple(range(n_blocks))
    return subsets


def layer_subsets(n_blocks: int, extra: dict[str, list[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """:func:`standard_subsets` plus the user's named ``extra`` subsets (``laplace.subsets``)."""
    subsets = standard_subsets(n_blocks)
    for name, blocks in (extra or {}).items():
        bad = [b for b in blocks if not 0 <= b < n_blocks]
        if not blocks or bad or name in subsets:
            raise ValueError(
                f"laplace.subsets.{name}={blocks}: need a new name and block indices in "
                f"0..{n_blocks - 1} (the model has {n_blocks} blocks)"
            )
        subsets[name] = tuple(blocks)
    return subsets
