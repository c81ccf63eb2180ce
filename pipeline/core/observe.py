"""What the pipeline tells operators: structured stage lines, JSON logs, Prometheus metrics.

Every stage a study passes (received, queued, loaded, inferred, written, sent, failed) is one
log line from the ``pipeline.stage`` logger carrying the study UID, the job id and the stage's
duration, never patient data; with ``log_format: json`` each line is a JSON object. The same
call feeds the metrics (README: Metrics lists their names).

Components that fork (the worker's pool, several receiving processes) count in Prometheus'
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set before ``prometheus_client`` is first
imported, so :func:`prepare` runs at the start of each command and this module imports it lazily.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.settings import Settings

stage_log = logging.getLogger("pipeline.stage")
log = logging.getLogger(__name__)

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is a field.
_RECORD_KEYS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RECORD_KEYS})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # pynetdicom's INFO lines narrate every association (and at DEBUG, data sets): ours say
    # what matters, without identifiers.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))


def stage(
    name: str, *, job: str, study: str = "", seconds: float | None = None, **fields: Any
) -> None:
    """Log one stage of one job, and count it. ``fields`` are identifiers and numbers only
    (series UID, model, instances): never names, IDs or dates of a patient."""
    values = {"stage": name, "job": job, "study": study, **fields}
    if seconds is not None:
        values["seconds"] = round(seconds, 3)
    text = " ".join(f"{k}={v}" for k, v in values.items() if v not in ("", None))
    stage_log.info(text, extra=values)
    metrics = _metrics()
    if metrics is None:
        return
    metrics.stages.labels(name).inc()
    if seconds is not None:
        metrics.stage_seconds.labels(name).observe(seconds)


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


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        p = "dicom_pipeline_"
        self.stages = Counter(p + "stage_total", "Stages passed, by stage.", ["stage"])
        self.stage_seconds = Histogram(
            p + "stage_seconds",
            "Duration of each stage.",
            ["stage"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
        )
        self.instances = Counter(
            p + "instances_received_total", "Instances stored (C-STORE and STOW-RS)."
        )
        self.associations = Counter(
            p + "associations_total", "Associations, by outcome.", ["outcome"]
        )
        self.refused = Counter(
            p + "instances_refused_total",
            "Instances refused, by status (C-STORE) or Failure Reason (STOW-RS).",
            ["status"],
        )
        self.stow_requests = Counter(
            p + "stow_requests_total", "STOW-RS requests, by HTTP status answered.", ["status"]
        )
        self.queued = Counter(
            p + "jobs_queued_total", "Jobs sent to the queue, by source.", ["source"]
        )
        self.completed = Counter(p + "jobs_completed_total", "Jobs whose results are written.")
        self.failed = Counter(
            p + "jobs_failed_total", "Jobs moved to failed/, by stage.", ["stage"]
        )
        # The lanes' service levels (a stroke CT's minutes against a night's backlog): alert on
        # the urgent lane's, e.g. its 95th percentile over the last hour.
        self.turnaround = Histogram(
            p + "turnaround_seconds",
            "From the first instance received (or the file dropped) to every result written, "
            "by lane.",
            ["priority"],
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
        )
        self.triton = Histogram(
            p + "triton_request_seconds",
            "Triton inference calls as the worker sees them, by model.",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


_instance: _Metrics | None = None
# Associations start in threads of their own: two first counts at once must not both register
# the metrics (prometheus_client refuses the second, and the handler that counted fails).
_instance_lock = threading.Lock()


def _metrics() -> _Metrics | None:
    """The process's metrics, created on first use; None if prometheus_client is unusable."""
    global _instance
    if _instance is None:
        with _instance_lock, contextlib.suppress(ImportError):
            if _instance is None:
                _instance = _Metrics()
    return _instance


def count(name: str, *labels: str, amount: float = 1.0) -> None:
    """Increment one of the counters: ``instances``, ``refused`` (status), ``associations``
    (outcome), ``stow_requests`` (status), ``queued`` (source), ``completed``, ``failed``
    (stage)."""
    metrics = _metrics()
    if metrics is None:
        return
    metric = getattr(metrics, name)
    (metric.labels(*labels) if labels else metric).inc(amount)


def turnaround(priority: str, seconds: float) -> None:
    metrics = _metrics()
    if metrics is not None:
        metrics.turnaround.labels(priority).observe(seconds)


def triton_call(model: str, seconds: float) -> None:
    metrics = _metrics()
    if metrics is not None:
        metrics.triton.labels(model).observe(seconds)


class QueueDepth:
    """A collector reading the queues' lengths from Redis when scraped (the worker's endpoint)."""

    def __init__(self, broker_url: str, queues: tuple[str, ...]) -> None:
        self.broker_url = broker_url
        self.queues = queues

    def collect(self) -> Any:
        import redis
        from prometheus_client.core import GaugeMetricFamily

        from pipeline.runtime import embedded_redis

        family = GaugeMetricFamily(
            "dicom_pipeline_queue_depth", "Messages waiting in the queue.", labels=["queue"]
        )
        try:
            client = embedded_redis.client(self.broker_url, timeout=2.0)
            for queue in self.queues:
                family.add_metric([queue], float(client.llen(queue)))
            client.close()
        except (redis.RedisError, OSError) as exc:
            log.warning("queue depth not read: %s", type(exc).__name__)
        yield family
