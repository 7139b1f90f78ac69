"""pingu-dask: cohort-scale perivascular space segmentation with nnU-Net on Dask."""

from __future__ import annotations

from pingu_dask.version import __version__

__all__ = ["__version__", "open_results"]


def __getattr__(name: str):
    # Imported on first use: workers import this package and need no xarray.
    if name == "open_results":
        from pingu_dask.output.results import open_results

        return open_results
    raise AttributeError(f"module 'pingu_dask' has no attribute {name!r}")
