"""The output directory, a contract that users and tests read.

layout (folder names, run.json, NIfTI names), masks (Zarr, written whole), tables
(Parquet parts, flushes) and compaction, ledger (attempts, the resume plan), lock
(OUT/.lock), files (atomic writes), results (open_results: xarray and pandas views).
"""
