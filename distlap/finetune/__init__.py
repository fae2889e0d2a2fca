"""The fine-tuning wing: a backbone and a PEFT method trained to the MAP of its prior.

data (splits, loaders) -> backbones (from_pretrained, fresh head) <- pretrain (distlap's tiny ViTs) ->
adapters (peft: LoRA, NormTune, Hybrid) -> train (the MAP) -> run (:func:`~distlap.finetune.run.fine_tune`,
save and restore). torch / transformers / peft only: never Ray, Optuna, MLflow, nor :mod:`distlap.bayes`.
"""
