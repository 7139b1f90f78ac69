"""`python -m pingu_dask.cli`: the same as the `pingu-dask` command."""

from pingu_dask.cli import main

main()
