"""The Bayesian wing: a Laplace approximation at the MAP and the restricted posteriors of layer subsets.

layers (which block a parameter is in; the subsets) -> curvature (the exact GGN diagonal) -> posterior
(one laplace-torch fit) -> predictive (nn, glm) -> evaluate (a subset's row) -> layerwise (the pipeline).
torch / laplace-torch only: never Ray, Optuna, MLflow, nor :mod:`distlap.finetune` (the model and its
loaders come in as arguments, :class:`~distlap.bayes.layerwise.LaplaceData`).
"""
