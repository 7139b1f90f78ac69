"""Running a cohort: the three per-scan stages, the driver's loop (window, retries, time
limits, circuit breaker), one run from lock to run.json, Dask clusters (local, SLURM,
PBS) and the batch workers' entry point.
"""
