"""pingu-dask: cohort-scale perivascular space segmentation with nnU-Net on Dask."""

__version__ = "0.1.0"
