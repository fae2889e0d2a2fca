"""The sweep wing, the only one that imports Ray, Optuna or MLflow.

settings (the validated sweep config) -> search (Optuna over an RDB study) and tracking (MLflow runs)
-> trainable (one Ray Tune trial: fine-tune, Laplace, log) and subset_tasks (nn subsets as Ray tasks)
-> driver (``run_sweep``: Ray, the Tuner, resume, ``summary.csv``) -> cli (the sweep scripts' command line).
"""
