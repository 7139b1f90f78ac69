"""The driver's side of watching a run or a training: it registers the monitor on the
scheduler (with the pages that serve it, pages.Pages) and sends it what only the driver
knows: a scan's failure is final or will be retried (RunFeed); a training's stages,
fold verdicts and its end (TrainFeed).
"""

from __future__ import annotations

import logging

from distributed.diagnostics.plugin import SchedulerPlugin

from pingu_dask.monitor.pages import PAGES_NAME, Pages
from pingu_dask.monitor.plugin import FAILURE_FIELDS, PLUGIN_NAME, TOPIC, RunMonitor
from pingu_dask.monitor.training import TRAIN_PLUGIN_NAME, TRAIN_TOPIC, TrainMonitor
from pingu_dask.records import ScanResult

logger = logging.getLogger(__name__)


class Feed:
    """Registers a monitor under `name` and sends it events on `topic` with its token.

    Whatever goes wrong here (a scheduler without pingu-dask installed, a scheduler
    that is going away) is logged and otherwise ignored: watching must never stop a run.
    """

    def __init__(
        self, client, monitor: SchedulerPlugin, token: str, name: str, topic: str, what: str
    ) -> None:
        self.client = client
        self.token = token
        self.topic = topic
        self.active = False
        try:
            # One before this one on the same scheduler left its monitor: replace it
            # (the scheduler would warn on an overwrite). The pages stay once there.
            present = client.run_on_scheduler(_plugin_names)
            if PAGES_NAME not in present:
                client.register_plugin(Pages(), name=PAGES_NAME)
            if name in present:
                client.unregister_scheduler_plugin(name)
            client.register_plugin(monitor, name=name)
            self.active = True
        except Exception as error:  # see the class docstring
            logger.warning("the pingu dashboard is off for this %s: %s", what, error)

    def _send(self, **message) -> None:
        if not self.active:
            return
        try:
            self.client.log_event(self.topic, {"token": self.token, **message})
        except Exception as error:  # see the class docstring
            logger.warning("could not update the pingu dashboard: %s", error)
            self.active = False


class RunFeed(Feed):
    """The driver's link to its run's monitor: registers it, sends it the verdicts."""

    def __init__(self, client, monitor: RunMonitor) -> None:
        super().__init__(client, monitor, monitor.token, PLUGIN_NAME, TOPIC, "run")

    def failed(self, index: int, result: ScanResult, site: str | None, final: bool) -> None:
        """A scan's attempt failed: for good (final) or to be retried."""
        message = {key: getattr(result, key, None) for key in FAILURE_FIELDS}
        message["site"] = site
        self._send(event="failed" if final else "retry", index=index, **message)

    def ended(self, status: str) -> None:
        self._send(event="ended", status=status)


class TrainFeed(Feed):
    """The driver's link to a training's monitor: registers it under TRAIN_PLUGIN_NAME
    (replacing an earlier training's), sends it stages, fold verdicts and the end.
    Workers send their folds' "started" and "epoch" events themselves with the same
    token (`get_worker().log_event(TRAIN_TOPIC, ...)`). As for RunFeed, errors are
    logged and ignored: watching must never stop a training."""

    def __init__(self, client, monitor: TrainMonitor) -> None:
        super().__init__(client, monitor, monitor.token, TRAIN_PLUGIN_NAME, TRAIN_TOPIC, "training")

    def send(self, **message) -> None:
        """One event, e.g. send(event="stage", stage="plan", done=0, total=1); the token
        is added. It goes through msgpack: plain ints, floats, strings, None."""
        self._send(**message)

    def ended(self, status: str) -> None:
        """The whole training ended: finished, interrupted or failed."""
        self._send(event="ended", status=status)


def _plugin_names(dask_scheduler) -> list[str]:
    return list(dask_scheduler.plugins)
