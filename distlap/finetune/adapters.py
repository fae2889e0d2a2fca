"""PEFT methods through the ``peft`` library: LoRA, NormTune (LayerNorm tuning) and Hybrid.

- ``lora``: low-rank adapters on the query/value projections (Hu et al. 2021), head trained.
- ``norm``: LayerNorm weights and biases (``LNTuningConfig``; Zhao et al. 2023), head trained.
- ``hybrid``: LoRA plus every LayerNorm and the head (``modules_to_save``).

"Tuned Params %" = trainable / total parameters of the adapted model, as peft counts them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from distlap.config import PeftConfig

HEAD = "classifier"
# LayerNorm module names shared by transformers 4.x and 5.x ViTs (per block, and the final one).
LAYERNORMS = ["layernorm_before", "layernorm_after", "layernorm"]


@dataclass(frozen=True)
class TunedParams:
    trainable: int
    total: int

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / self.total


def query_value_modules(model: nn.Module) -> list[str]:
    """The attention query/value projection names of this transformers version."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in (["q_proj", "v_proj"], ["query", "value"]):
        if set(pair) <= names:
            return pair
    raise ValueError(
        f"{type(model).__name__} has neither q_proj/v_proj nor query/value modules; "
        "set peft.target_modules explicitly"
    )


def apply_peft(model: nn.Module, cfg: PeftConfig):
    """Wrap ``model`` (an HF image classifier) in a peft model with only the method's params trainable."""
    from peft import LNTuningConfig, LoraConfig, get_peft_model

    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if HEAD not in module_names:
        raise ValueError(f"{type(model).__name__} has no `{HEAD}` head module")
    norms = [n for n in LAYERNORMS if n in module_names]
    if cfg.method == "norm":
        peft_cfg = LNTuningConfig(target_modules=norms, modules_to_save=[HEAD])
    else:
        targets = cfg.target_modules or query_value_modules(model)
        missing = [t for t in targets if t not in module_names]
        if missing:
            raise ValueError(
                f"peft.target_modules={targets}: no module named {missing} in {type(model).__name__}"
            )
        extra = norms if cfg.method == "hybrid" else []
        peft_cfg = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            modules_to_save=[HEAD, *extra],
        )
    with warnings.catch_warnings():
        # LNTuning warns that nn.LayerNorm is an "unsupported layer type"; it is what it tunes.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def tuned_params(peft_model) -> TunedParams:
    trainable, total = peft_model.get_nb_trainable_parameters()
    return TunedParams(int(trainable), int(total))
