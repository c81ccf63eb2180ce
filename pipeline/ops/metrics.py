"""Each component's Prometheus endpoint: its processes' counts together, and the queues'
depths on the worker's (docs/reference/metrics.md lists the names).

Components that fork (the worker's pool, several receiving processes) count in Prometheus'
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set before ``prometheus_client`` is first
imported, so :func:`prepare` runs at the start of each command and the counters
(:mod:`pipeline.core.observe`) import it lazily.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.settings import Settings

log = logging.getLogger(__name__)


def prepare(settings: Settings, component: str) -> Path:
    """Before anything imports prometheus_client in this process: a fresh multiprocess
    directory for this run of the component, inherited by the processes it forks. Named
    after the process, so a second worker on the same data folder keeps its own counts;
    folders of processes that are gone are removed."""
    root = settings.run_dir / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{component}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{component}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def serve(settings: Settings, component: str, collectors: tuple[Any, ...] = ()) -> int | None:
    """The component's /metrics endpoint (all its processes together), or None when its port
    is 0 or taken: metrics never stop a service."""
    port = int(getattr(settings.metrics, f"{component}_port"))
    if port == 0:
        return None
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for collector in collectors:
        registry.register(collector)
    try:
        start_http_server(port, addr=settings.metrics.host, registry=registry)
    except OSError as exc:
        log.warning("%s metrics endpoint not started on port %d: %s", component, port, exc)
        return None
    log.info("%s metrics on http://%s:%d/metrics", component, settings.metrics.host, port)
    return port


class QueueDepth:
    """A collector reading the queues' lengths from Redis when scraped (the worker's endpoint)."""

    def __init__(self, broker_url: str, queues: tuple[str, ...]) -> None:
        self.broker_url = broker_url
        self.queues = queues

    def collect(self) -> Any:
        import redis
        from prometheus_client.core import GaugeMetricFamily

        from pipeline.tasks import broker

        family = GaugeMetricFamily(
            "dicom_pipeline_queue_depth", "Messages waiting in the queue.", labels=["queue"]
        )
        try:
            client = broker.client(self.broker_url, timeout=2.0)
            for queue in self.queues:
                family.add_metric([queue], float(client.llen(queue)))
            client.close()
        except (redis.RedisError, OSError) as exc:
            log.warning("queue depth not read: %s", type(exc).__name__)
        yield family
