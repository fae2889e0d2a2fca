"""An exported predictor: one trial's fine-tuned model and one subset's Laplace posterior, as files.

bundle (the folder's layout, its settings and SHA-256 checksums) -> build (the folder written from a
trial's files) -> predictor (the MLflow pyfunc loader module: raw images in, the subset's probit GLM
probabilities out). torch, transformers, peft and safetensors only: never Ray, Optuna or MLflow, so that
loading an exported model pulls in none of them (``python -m distlap.export`` saves and registers it).
"""
