"""Training: a manifest with reference masks -> an nnU-Net model, its folds on Dask."""
