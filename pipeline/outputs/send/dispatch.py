"""DICOM results sent to the route's destinations, with nothing lost: a PACS by C-STORE, a
DICOMweb service (a destination with ``url``) by STOW-RS (:mod:`pipeline.outputs.send.stow`).

The worker hands each route's SR and SEG files to one Celery task per destination
(:func:`pipeline.tasks.enqueue.offer`): a JSON message naming the files under ``results/``.
The task sends them; what fails for a reason that may pass (destination down or busy, no
answer) is retried with exponential backoff and full jitter, only the files not yet accepted,
up to the destination's ``max_retries``. The files stay in results throughout. A refusal for
good (association rejected permanently, a failure status) or retries run out end in
``data/failed/<job>.send-<destination>/error.json``, naming the files, which are still in
results to be sent again.

An object is sent to a destination once: what a destination accepted is recorded beside it
(``.sent/<destination>/<file>.uid``, holding its SOP Instance UID), and a job done again (its
worker was lost after sending) makes the same objects, under the same UIDs, which are not sent
again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from pydicom import dcmread

from pipeline.core import tls
from pipeline.core.fsutil import atomic_write_bytes, atomic_write_json
from pipeline.core.jobs import now
from pipeline.core.network_settings import Destination
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.outputs.send import scu
from pipeline.outputs.send import stow as stow_send

log = logging.getLogger(__name__)

SENT_FOLDER = ".sent"  # beside a result's DICOM objects: which destination accepted which


class Delivery(BaseModel):
    """The task message: files (relative to the results folder) for one destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: str
    destination: str
    files: list[str]
    priority: Priority = Priority.ROUTINE  # an urgent route's results are sent ahead


@dataclass
class Outcome:
    sent: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # to retry: the failure may pass
    refused: dict[str, str] = field(default_factory=dict)  # for good, with the reason


def stow_target(destination: Destination) -> stow_send.StowTarget:
    assert destination.url is not None
    tls_files = (destination.tls_ca, destination.tls_certificate, destination.tls_private_key)
    return stow_send.StowTarget(
        destination.url, destination.timeout_s, tls_files, destination.bearer_token_file
    )


def peer(destination: Destination) -> scu.Peer:
    assert destination.host and destination.port and destination.ae_title
    context = None
    if destination.tls:
        context = tls.client_context(
            destination.tls_ca, destination.tls_certificate, destination.tls_private_key
        )
    return scu.Peer(
        host=destination.host,
        port=destination.port,
        called_aet=destination.ae_title,
        calling_aet=destination.calling_ae_title,
        tls=context,
        timeout_s=destination.timeout_s,
    )


def deliver(settings: Settings, delivery: Delivery) -> Outcome:
    """One attempt at sending every file of the delivery."""
    outcome = Outcome()
    destination = settings.destinations.get(delivery.destination)
    if destination is None:
        outcome.refused = dict.fromkeys(delivery.files, "destination no longer configured")
        return outcome
    root = settings.results_dir.resolve()
    paths: dict[Path, str] = {}
    for name in delivery.files:
        path = (root / name).resolve()
        if not path.is_relative_to(root):  # a message naming files outside results: refused
            outcome.refused[name] = "not a file in the results folder"
        elif not path.is_file():
            outcome.refused[name] = "no longer in the results folder"
        else:
            paths[path] = name
    for path in [p for p in paths if _accepted_before(p, delivery.destination)]:
        log.info("%s: accepted by %s before; not sent again", paths.pop(path), delivery.destination)
    if not paths:
        return outcome
    if destination.url is not None:
        report = stow_send.send(list(paths), stow_target(destination))
    else:
        report = scu.send(list(paths), peer(destination), retries=0)
    outcome.sent = [paths[p] for p in report.sent]
    for path in report.sent:
        _record_accepted(path, delivery.destination)
    for path, why in report.failed.items():
        if path in report.transient:
            outcome.pending.append(paths[path])
        else:
            outcome.refused[paths[path]] = why
    return outcome


def _record(path: Path, destination: str) -> Path:
    return path.parent / SENT_FOLDER / destination / f"{path.name}.uid"


def _sop_instance(path: Path) -> str:
    return str(
        dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get(
            "SOPInstanceUID", ""
        )
    )


def _accepted_before(path: Path, destination: str) -> bool:
    """Whether ``destination`` accepted this very object (by SOP Instance UID) before."""
    try:
        return _record(path, destination).read_text() == _sop_instance(path)
    except (OSError, ValueError):
        return False  # no record, or one that cannot be compared: sent


def _record_accepted(path: Path, destination: str) -> None:
    try:
        record = _record(path, destination)
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record, _sop_instance(path).encode())
    except (OSError, ValueError) as exc:  # the object was sent: a missing record costs a resend
        log.warning("%s sent to %s, not recorded: %s", path.name, destination, exc)


def record_failure(settings: Settings, delivery: Delivery, reasons: dict[str, str]) -> Path:
    """``data/failed/<job>.send-<destination>/error.json``: what was not sent, and why."""
    folder = settings.failed_dir / f"{delivery.job_id}.send-{delivery.destination}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        folder / "error.json",
        {
            "type": "DeliveryError",
            "message": "; ".join(f"{name}: {why}" for name, why in reasons.items()),
            "stage": "dispatch",
            "time": now().isoformat(),
            "destination": delivery.destination,
            "files": sorted(reasons),
            "priority": delivery.priority.value,
            "job": {"id": delivery.job_id},
        },
    )
    return folder
