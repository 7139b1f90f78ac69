"""Test, demo and benchmark data: synthetic phantoms and cohorts, and real heads resliced."""
