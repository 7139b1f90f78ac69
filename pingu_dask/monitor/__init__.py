"""Watching a run: the scheduler plugin, the run's page and Prometheus metrics."""
