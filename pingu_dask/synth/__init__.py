"""Test, demo and benchmark data: synthetic phantoms and cohorts (real heads for the
benchmarks are in scripts/benchkit/anatomy.py)."""
