"""distlap: distributed sweeps for Bayesian parameter-efficient fine-tuning of Vision Transformers.

Three wings over a floor (see "How the code is organised" in the README):

- floor: :mod:`~distlap.config`, :mod:`~distlap.names` (the vocabulary), :mod:`~distlap.zoo`,
  :mod:`~distlap.metrics`, :mod:`~distlap.provenance`, :mod:`~distlap.runtime`, :mod:`~distlap.plots`;
- :mod:`distlap.finetune` (a MAP model) and :mod:`distlap.bayes` (Laplace, restricted posteriors), which
  never import each other; :mod:`distlap.trial` joins them for one trial;
- :mod:`distlap.sweep`: Ray Tune, Optuna and MLflow, the only wing that imports them.
"""

__version__ = "0.1.0"
