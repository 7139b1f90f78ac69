"""pingu-dask's version: a leaf every layer may import (outputs record it), so that no
module has to import the package root, which sits above them all."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version
