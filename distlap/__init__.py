"""distlap: distributed sweeps for Bayesian parameter-efficient fine-tuning of Vision Transformers.

The numerical core (config, data, backbones, adapters, train, layers, metrics, trial) imports
neither Ray, Optuna nor MLflow.
"""

__version__ = "0.1.0"
