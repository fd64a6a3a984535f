"""Benchmarking: the grid runner, the results store and what is built from it.

    store.py      SQLite results store (schema version, one transaction per cell)
    grid.py       GridSpec / presets as data / run_grid (resumable, failures recorded)
    executors.py  where cells run: LocalExecutor (in process), RayExecutor (a Ray cluster)
    timing.py     latency at batch 1 and 32, parameter counts, machine facts
    artifacts.py  per-run curves and gallery images beside the database
    tables.py     the evaluation paper's Tables 1, 3/4, 5/6 (md, csv, latex)
    recommend.py  constraints -> Pareto front -> one recommendation with reasons

The HTML report is ``vitqc.report.html``; the commands are in ``vitqc.cli_bench``.
"""
