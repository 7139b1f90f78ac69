"""What the benchmark scripts share (not part of the installed package).

- `benchdoc`: writes a script's section of docs/benchmarks.md;
- `anatomy`: real heads (Colin27, MNI152) and copies of them on other grids.

The scripts run as files (`python scripts/bench_x.py`), so their folder is first on
sys.path and `from benchkit import benchdoc` finds this package with no path edits.
"""
