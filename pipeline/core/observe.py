"""What the pipeline tells operators: structured stage lines, JSON logs, Prometheus metrics.

Every stage a study passes (received, queued, loaded, inferred, written, sent, failed) is one
log line from the ``pipeline.stage`` logger carrying the study UID, the job id and the stage's
duration, never patient data; with ``log_format: json`` each line is a JSON object. The same
call feeds the metrics (docs/reference/metrics.md lists their names).

Components that fork count in Prometheus' multiprocess mode, whose folder must be named before
``prometheus_client`` is first imported (:func:`pipeline.ops.metrics.prepare`): this module
imports it lazily. The endpoints are :mod:`pipeline.ops.metrics`'.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from datetime import UTC, datetime
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
        self._jobs(p)
        self.unrouted = Counter(
            p + "unrouted_total",
            "Series and inbox files no routing rule takes, in jobs with nothing to process, by "
            "what the unrouted setting did (ignore, keep, fail), kind, modality and SOP class.",
            ["policy", "kind", "modality", "sop_class"],
        )
        self.dropped = Counter(
            p + "instances_dropped_total",
            "Instances acknowledged and not kept, as receiver.accept_modalities and "
            "accept_sop_classes ask, by modality and SOP class.",
            ["modality", "sop_class"],
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

    def _jobs(self, p: str) -> None:
        from prometheus_client import Counter

        self.queued = Counter(
            p + "jobs_queued_total", "Jobs sent to the queue, by source.", ["source"]
        )
        self.completed = Counter(p + "jobs_completed_total", "Jobs whose results are written.")
        self.pulled_instances = Counter(
            p + "pulled_instances_total",
            "Instances retrieved from a PACS by `dicom-pipeline pull`, by source.",
            ["source"],
        )
        self.pulled_studies = Counter(
            p + "pulled_studies_total",
            "Studies retrieved whole from a PACS and handed over, by source.",
            ["source"],
        )
        self.pull_failures = Counter(
            p + "pull_failures_total",
            "Retrieves from a PACS that failed (association refused, retrieve failed "
            "part-way), by source; each is asked again up to the source's retries.",
            ["source"],
        )
        self.redelivered = Counter(
            p + "jobs_redelivered_total",
            "Jobs offered again because the worker that had taken them was lost (its lease "
            "expired: killed, its node gone, or hung).",
        )
        self.failed = Counter(
            p + "jobs_failed_total", "Jobs moved to failed/, by stage.", ["stage"]
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
    (stage), ``unrouted`` (policy, kind, modality, SOP class), ``dropped`` (modality, SOP
    class), ``redelivered``, ``pulled_instances``, ``pulled_studies``, ``pull_failures``
    (source)."""
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
