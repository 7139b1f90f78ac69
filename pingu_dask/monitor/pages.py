"""Serving the monitors: /pingu, /pingu/status.json and the pingu_* metrics on /metrics.

A scheduler plugin of its own, registered (once per scheduler) by the driver's feed
before the first monitor: the monitors only count, and the web server finds them among
the scheduler's plugins (http.status, prometheus.MetricsCollector). So the counting
modules import nothing that serves them, and this module sits above both.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import SchedulerPlugin

from pingu_dask.monitor.http import add_routes
from pingu_dask.monitor.prometheus import METRICS

PAGES_NAME = "pingu-pages"


class Pages(SchedulerPlugin):
    """Adds the run page's routes to the scheduler's web server and its monitors to
    /metrics (both once per scheduler)."""

    async def start(self, scheduler) -> None:
        add_routes(scheduler)
        METRICS.watch(scheduler)
