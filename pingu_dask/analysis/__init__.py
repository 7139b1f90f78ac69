"""One mask -> the numbers a study reports: clusters, regions, metrics, evaluation (numpy)."""
