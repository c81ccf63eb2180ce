"""What the pipeline is doing now, read from the data folder and Redis: for `dicom-pipeline
status` and the web status page.

Everything here reads; nothing changes a file. The folders are the truth (a study being
received is a spool folder, a queued job a job folder, a result a result.json, a failure a
folder under failed/), so the view is right even when a component is down.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core import unrouted
from pipeline.core.errors import BrokerUnavailableError
from pipeline.core.instances import INCOMING
from pipeline.core.jobs import PROCESSING_MARKER, is_job_id, queued_lane, read_job
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.ingest.pull import plan
from pipeline.ops import failed
from pipeline.studies.admission import Ledger

RECENT = 30  # results shown
MAX_STUDY_DIRS = 200  # newest result folders scanned for them


@dataclass(frozen=True)
class InFlight:
    what: str  # study UID or inbox name
    state: str  # receiving | queued | processing (each maybe urgent) | waiting for Redis
    age_s: float
    detail: str  # instances received, or the job id


@dataclass(frozen=True)
class ResultRow:
    finished: datetime
    job_id: str
    source: str
    what: str  # study UID (DICOM) or the inbox name
    series_uid: str
    model: str
    label: str
    probability: float
    lesions: int | None  # segmentation models only
    images: dict[str, int] | None  # a series taken image by image: images per label
    total_s: float  # received -> result
    urgent: bool  # its job waited in the urgent lane
    inference_ms: float
    preview: str | None  # path under results/: the first key image where one was made
    objects: tuple[str, ...] = ()  # the DICOM objects and the report beside result.json

    @property
    def findings(self) -> str:
        """What the label alone does not say: lesions found, or the images' labels."""
        if self.lesions is not None:
            return f"{self.lesions} lesion(s)"
        if self.images:
            counts = ", ".join(f"{label} {n}" for label, n in self.images.items())
            return f"{sum(self.images.values())} images: {counts}"
        return ""


@dataclass(frozen=True)
class FailedRow:
    id: str
    kind: str
    when: str
    what: str
    stage: str
    error: str


@dataclass(frozen=True)
class UnroutedToday:
    """Inputs no rule took today (UTC), by modality, and those kept for a later rule."""

    jobs: int = 0
    by_modality: dict[str, int] = field(default_factory=dict)
    kept: int = 0

    @property
    def line(self) -> str:
        """ "unrouted today: 1,204; by modality MR 900, US 304; kept 0" for status readers."""
        text = f"unrouted today: {self.jobs:,}"
        if self.by_modality:
            text += "; by modality " + ", ".join(f"{m} {n:,}" for m, n in self.by_modality.items())
        return text + (f"; kept for a later rule: {self.kept:,}" if self.kept else "")


@dataclass
class Memory:
    """This machine's memory budget for studies and what the volumes in flight take of it."""

    budget_mb: int
    in_flight_mb: int
    volumes: int
    limit_mb: int
    idle_mb: int  # in use while no study ran; 0 where worker.memory_budget_mb sets the budget
    measured: str

    @property
    def line(self) -> str:
        text = (
            f"memory: {self.volumes} volume(s) in flight take {self.in_flight_mb:,} of the "
            f"{self.budget_mb:,} MB budget for studies"
        )
        if self.idle_mb:
            text += f"; {self.idle_mb:,} of {self.limit_mb:,} MB in use while idle"
        return text + f" (measured {self.measured})"


def memory(settings: Settings) -> Memory | None:
    """None where this account cannot use the ledger (a read-only data folder, say): status
    still shows the rest."""
    try:
        ledger = Ledger.for_host(settings.data_dir, settings.worker.memory_budget_mb)
        budget, reserved = ledger.state()
    except OSError:
        return None
    return Memory(
        budget.studies_mb,
        sum(reserved.values()),
        len(reserved),
        budget.limit_mb,
        budget.idle_mb,
        budget.measured,
    )


@dataclass
class Snapshot:
    taken: datetime
    broker: str  # "ok" or why not
    queues: dict[str, int] = field(default_factory=dict)
    in_flight: list[InFlight] = field(default_factory=list)
    results: list[ResultRow] = field(default_factory=list)
    failed: list[FailedRow] = field(default_factory=list)
    unrouted: UnroutedToday = UnroutedToday()
    memory: Memory | None = None
    pulls: list[str] = field(default_factory=list)  # pulls in progress, one line each

    def as_json(self) -> dict[str, Any]:
        def plain(rows: list[Any]) -> list[dict[str, Any]]:
            return [{k: _jsonable(v) for k, v in vars(r).items()} for r in rows]

        return {
            "taken": self.taken.isoformat(),
            "broker": self.broker,
            "queues": self.queues,
            "in_flight": plain(self.in_flight),
            "results": plain(self.results),
            "failed": plain(self.failed),
            "unrouted": {**vars(self.unrouted), "today": str(self.taken.date())},
            "memory": vars(self.memory) if self.memory else None,
            "pulls": self.pulls,
        }


def _jsonable(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


def snapshot(settings: Settings, broker_url: str | None = None) -> Snapshot:
    snap = Snapshot(taken=datetime.now(UTC), broker="not asked")
    lost = None
    if broker_url:
        snap.broker, snap.queues = _queues(broker_url)
        lost = _lost_jobs(broker_url) if snap.broker == "ok" else None
    snap.in_flight = _in_flight(settings, lost)
    snap.results = recent_results(settings)
    snap.failed = [
        FailedRow(
            id=item.id,
            kind=item.kind,
            when=item.when,
            what=item.what,
            stage=str(item.error.get("stage", "")),
            error=str(item.error.get("message") or item.error.get("error") or ""),
        )
        for item in reversed(failed.items(settings))
    ]
    jobs, by_modality = unrouted.summary(settings.unrouted_dir, snap.taken.date())
    snap.unrouted = UnroutedToday(jobs, by_modality, len(unrouted.kept(settings.unrouted_dir)))
    snap.memory = memory(settings)
    snap.pulls = pull_lines(settings)
    return snap


def pull_lines(settings: Settings) -> list[str]:
    """Pulls not finished (being retrieved, or interrupted): what is done of each."""
    lines = []
    for pull in plan.unfinished(settings.spool_dir):
        counts = pull.counts()
        done = len(pull.studies) - counts["pending"]
        failed = f", {counts['failed']} failed" if counts["failed"] else ""
        lines.append(
            f"pull {pull.id} from {pull.source}: {done} of {len(pull.studies)} studies{failed}"
        )
    return lines


def _queues(broker_url: str) -> tuple[str, dict[str, int]]:
    import redis

    from pipeline.tasks import broker
    from pipeline.tasks.app import QUEUE, URGENT_QUEUE

    try:
        client = broker.client(broker_url, timeout=2.0)
        try:
            # Celery on Redis: waiting messages are a list; taken-but-unacknowledged ones a hash.
            depth = {q: int(client.llen(q)) for q in (URGENT_QUEUE, QUEUE)}
            depth["unacked"] = int(client.hlen("unacked"))
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return f"unreachable ({type(exc).__name__})", {}
    return "ok", depth


def _lost_jobs(broker_url: str) -> Callable[[str], bool]:
    """Whether a taken job's worker was lost (its lease expired), until it is taken again."""
    from pipeline.tasks import broker
    from pipeline.tasks.leases import Leases

    leases = Leases(broker.client(broker_url, timeout=2.0))

    def lost(job_id: str) -> bool:
        try:
            return leases.lost(job_id)
        except BrokerUnavailableError:
            return False  # cannot tell: shown as processing

    return lost


def _in_flight(settings: Settings, lost: Callable[[str], bool] | None = None) -> list[InFlight]:
    rows: list[InFlight] = []
    spool = settings.spool_dir
    if not spool.is_dir():
        return rows
    now = time.time()
    for entry in sorted(spool.iterdir()):
        if entry.name.startswith(".") or entry.name == INCOMING or not entry.is_dir():
            continue
        if is_job_id(entry.name):
            try:
                job = read_job(entry)
            except (OSError, ValueError):
                continue  # being made, or a crash left it half-made: start-up repairs it
            what = job.study.study_uid if job.study else job.original_name
            age = now - job.received_at.timestamp()
            lane = queued_lane(entry)  # kept until the job is done
            urgent = " (urgent)" if lane == Priority.URGENT else ""
            if (entry / PROCESSING_MARKER).exists():
                gone = lost is not None and lost(entry.name)
                state = ("worker lost, to be offered again" if gone else "processing") + urgent
            elif lane is not None:
                state = "queued" + urgent
            else:
                state = "waiting for Redis"
            rows.append(InFlight(what, state, age, job.id))
        else:  # a study still being received: <StudyUID>/<SeriesUID>/<SOP>.dcm
            try:
                files = list(entry.rglob("*.dcm"))
                newest = max((p.stat().st_mtime for p in files), default=entry.stat().st_mtime)
            except OSError:
                continue  # handed over (renamed into a job) while we looked
            rows.append(InFlight(entry.name, "receiving", now - newest, f"{len(files)} instances"))
    return rows


def recent_results(settings: Settings, limit: int = RECENT) -> list[ResultRow]:
    results = settings.results_dir
    if not results.is_dir():
        return []
    dated = []
    for e in os.scandir(results):
        if e.is_dir() and not e.name.startswith("."):
            try:
                dated.append((e.stat().st_mtime, e.path))
            except OSError:
                continue  # pruned while we looked
    folders = [path for _, path in sorted(dated, reverse=True)[:MAX_STUDY_DIRS]]
    rows = []
    for folder in folders:
        for path in Path(folder).rglob("result.json"):
            row = _row(path, results)
            if row is not None:
                rows.append(row)
    rows.sort(key=lambda r: r.finished, reverse=True)
    return rows[:limit]


def _labels(images: object) -> dict[str, int]:
    """How many images got each label, the most frequent first; nothing for a list that is
    not one of answers (a result.json being replaced, or of another schema)."""
    try:
        counts = Counter(str(i["prediction"]["label"]) for i in images)  # type: ignore[attr-defined]
    except (KeyError, TypeError):
        return {}
    return dict(counts.most_common())


def _row(path: Path, results: Path) -> ResultRow | None:
    try:
        doc = json.loads(path.read_text())
        timings, prediction, source = doc["timings"], doc["prediction"], doc["input"]
        finished = datetime.fromisoformat(timings["finished"])
        received = datetime.fromisoformat(timings["received"])
        label = str(prediction["label"])
        probability = float(prediction["probabilities"].get(label, 0.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # being replaced, or an older schema: not shown rather than guessed
    segmentation = doc.get("segmentation") or None
    preview = doc.get("preview")
    return ResultRow(
        finished=finished,
        job_id=str(doc.get("job_id", "")),
        source=str(source.get("source", "")),
        what=str(source.get("study_uid") or source.get("name") or ""),
        series_uid=str(source.get("series_uid") or ""),
        model=str(doc.get("model", {}).get("name", "")),
        label=label,
        probability=probability,
        lesions=len(segmentation["lesions"]) if segmentation else None,
        images=_labels(doc.get("images") or []) or None,
        total_s=(finished - received).total_seconds(),
        urgent=doc.get("priority") == Priority.URGENT,
        inference_ms=float(timings.get("inference_ms", 0.0)),
        preview=str((path.parent / preview).relative_to(results)) if preview else None,
        objects=_objects(doc),
    )


def _objects(doc: dict[str, Any]) -> tuple[str, ...]:
    """What a result sent or filed beside it: sr, seg, sc x2, pr, report, kos."""
    names = [str(n).removesuffix(".dcm") for n in doc.get("dicom") or []]
    keys = sum(1 for n in names if n.startswith("sc-"))
    shown = [n for n in names if not n.startswith("sc-")]
    if keys:
        shown.insert(min(2, len(shown)), f"sc x{keys}" if keys > 1 else "sc")
    if doc.get("report") and "report" not in shown:
        shown.append("report.pdf")
    return tuple(shown)
