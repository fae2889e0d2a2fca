"""Turns a sweep's results into tables, plots, a summary JSON and one HTML page.

``python analysis/report.py <sweep output folder>`` (or ``--tracking-uri URI --experiment NAME``)
writes ``<output>/report/``; :func:`analysis.report.build_report` does the same from Python (the sweep
calls it at its end). One module per step:

- :mod:`analysis.collect`: a sweep output folder -> :class:`~analysis.collect.SweepData`
- :mod:`analysis.mlflow_io`: the same from MLflow runs, and logging the report to the parent run
- :mod:`analysis.aggregate`: per (trial, subset) rows -> per (config, subset) over seeds -> ranking
- :mod:`analysis.findings`: the key findings (``analysis_summary.json``) and their narrative
- :mod:`analysis.figures`, :mod:`analysis.optuna_views`: the PNGs
- :mod:`analysis.page`: the self-contained ``report.html``

The PEFT-methods sweep (``sweeps/peft_methods.py``) has its own report,
``python analysis/peft_methods.py <sweep output folder>`` (:func:`analysis.peft_methods.build_peft_report`):

- :mod:`analysis.peft_tables`: trials -> the consolidated Method | Tuned Params % | Acc@1 | ECE |
  Time/Epoch (s) table per (backbone, dataset), mean ± std over seeds
- :mod:`analysis.peft_figures`: the composite plots merging backbones
- :mod:`analysis.peft_methods`: the computed cross-setting trends, ``peft_methods.md`` and the page

Module names avoid ``html``, ``tables`` and other importable names: ``python analysis/report.py``
puts this folder first on ``sys.path``, where such a file would shadow the library of that name.
"""
