"""The run's page on the scheduler's web server: /pingu (a static page that polls) and
/pingu/status.json (the current run's snapshot and, when one is registered, the current
training's under "training"), next to the Dask dashboard. The web server binds to
localhost unless told otherwise (pingu.dashboard-address); from a laptop, reach it
through an SSH tunnel (README).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from distributed.http.utils import RequestHandler

from pingu_dask.monitor.plugin import PAGE_PATH, PLUGIN_NAME, RunMonitor
from pingu_dask.monitor.training import TRAIN_PLUGIN_NAME, TrainMonitor


def page_link(dashboard_link: str | None) -> str | None:
    """The run page's address, next to Dask's dashboard link (…/status -> …/pingu)."""
    if not dashboard_link:
        return None
    base = dashboard_link.removesuffix("/status").rstrip("/")
    return base + PAGE_PATH


def current_monitor(scheduler) -> RunMonitor | None:
    plugin = scheduler.plugins.get(PLUGIN_NAME) if scheduler is not None else None
    return plugin if isinstance(plugin, RunMonitor) else None


def current_training(scheduler) -> TrainMonitor | None:
    plugin = scheduler.plugins.get(TRAIN_PLUGIN_NAME) if scheduler is not None else None
    return plugin if isinstance(plugin, TrainMonitor) else None


def status(scheduler) -> dict | None:
    """The current run's snapshot, with the current training's "training" key beside
    it; either may be missing (None when both are)."""
    run, training = current_monitor(scheduler), current_training(scheduler)
    if run is None and training is None:
        return None
    return {
        **(run.snapshot() if run is not None else {}),
        **(training.snapshot() if training is not None else {}),
    }


class StatusHandler(RequestHandler):
    """GET /pingu/status.json: the current run's and training's snapshots."""

    def get(self) -> None:
        snapshot = status(self.server)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        if snapshot is None:
            self.set_status(404)
            self.write(json.dumps({"error": "no pingu-dask run on this scheduler"}))
            return
        self.write(json.dumps(snapshot))


class PageHandler(RequestHandler):
    """GET /pingu: a static page that polls status.json (no internet needed)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(page_html())


@functools.cache
def page_html() -> str:
    """The page, read from the package once per process."""
    return resources.files("pingu_dask.monitor").joinpath("dashboard.html").read_text("utf-8")


def add_routes(scheduler) -> None:
    """Add /pingu and /pingu/status.json to the scheduler's web server, once."""
    application = getattr(scheduler, "http_application", None)
    if application is None or getattr(application, "pingu_routes", False):
        return
    handlers = [
        (PAGE_PATH + "/?", PageHandler, {"dask_server": scheduler}),
        (PAGE_PATH + "/status.json", StatusHandler, {"dask_server": scheduler}),
    ]
    application.add_handlers(r".*$", handlers)
    application.pingu_routes = True
