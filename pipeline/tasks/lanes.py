"""Lanes: urgent studies are taken before routine ones.

A route may say ``priority: urgent`` (the stroke protocol, the emergency department's CT). When
a job is queued, its series are matched against the routes as the worker will match them, from
one header per series (no pixel data is read); a job with a series that an urgent rule takes
goes to the urgent queue. Workers ask Redis for the urgent queue first, so an urgent study waits
only for the tasks already running, never behind a backlog.

The decision costs nothing while no rule is urgent: no file is opened. A file that cannot be
read leaves its series out of the decision (the job waits as routine, and the worker reports
the file): choosing a lane never keeps a job from being queued.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from pipeline.core.contract import InputKind
from pipeline.core.filekinds import kind_of
from pipeline.core.instances import SUFFIX
from pipeline.core.jobs import Job, job_dir
from pipeline.core.routing import Priority, Route, SeriesFacts, decide, dicom_facts

log = logging.getLogger(__name__)


def priority_of(routes: tuple[Route, ...], spool: Path, job: Job) -> Priority:
    """Urgent when any series (or the inbox file) of the job is taken by an urgent rule."""
    if all(r.priority is Priority.ROUTINE for r in routes):
        return Priority.ROUTINE
    path = job_dir(spool, job.id) / job.input_file
    for facts in job_facts(path, job):
        route = decide(routes, facts).route
        if route is not None and route.priority is Priority.URGENT:
            return Priority.URGENT
    return Priority.ROUTINE


def job_facts(path: Path, job: Job) -> Iterator[SeriesFacts]:
    """What routing looks at, per series of a study folder or for one inbox file."""
    if job.study is not None:
        calling, called = job.study.calling_aet or "", job.study.called_aet or ""
        for series in sorted(p for p in _listing(path) if p.is_dir()):
            files = sorted(_listing(series, f"*{SUFFIX}"))
            ds = next((h for f in files if (h := _header(f)) is not None), None)
            if ds is not None:
                yield dicom_facts(ds, len(files), calling, called)
        return
    kind = kind_of(path)
    if kind is InputKind.IMAGE:
        yield SeriesFacts(kind="image", slices=1)
    elif kind is InputKind.NIFTI and (slices := _nifti_slices(path)) is not None:
        yield SeriesFacts(kind="nifti", slices=slices, volume=slices > 1)
    elif kind is InputKind.DICOM and (ds := _header(path)) is not None:
        yield dicom_facts(ds)


def _listing(folder: Path, pattern: str = "*") -> list[Path]:
    try:
        return list(folder.glob(pattern))
    except OSError:
        return []


def _header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
        log.debug("lane: a header not read (%s)", type(exc).__name__)
        return None


def _nifti_slices(path: Path) -> int | None:
    """As the worker counts them: a 3D volume's third axis (the header alone is read).
    nibabel is imported here: 0.3 s that the receiver and the watcher need not pay at start."""
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on malformed files
        log.debug("lane: a NIfTI header not read (%s)", type(exc).__name__)
        return None
    return int(shape[2]) if len(shape) >= 3 else 1
