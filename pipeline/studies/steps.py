"""What a study job and a file job share: the failure that names its stage, the hand-over of
results to their destinations, the settings of the DICOM outputs, and the end of a job (its
input archived or removed once every result is on disk)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import move_into
from pipeline.core.jobs import ENQUEUED_MARKER, REJECTED_OUTPUTS, Job, job_dir
from pipeline.core.routing import Route
from pipeline.core.settings import Settings
from pipeline.outputs.dicom import DicomOutputs
from pipeline.outputs.sources import Sources


class StageError(Exception):
    def __init__(self, stage: str, error: PipelineError) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


# Hands a route's DICOM results to its destinations (the worker queues a send task for each).
Dispatch = Callable[[Route, list[Path]], None]


def dicom_outputs(
    settings: Settings, job: Job, route: Route, sources: Sources | None, series_uid: str
) -> DicomOutputs:
    return DicomOutputs(
        kinds=route.outputs,
        sources=sources,
        key=f"{job.id}/{series_uid}",
        manufacturer=settings.output.manufacturer,
        institution=settings.output.institution_name,
        iod_check=settings.output.iod_check,
        reject_dir=job_dir(settings.spool_dir, job.id) / REJECTED_OUTPUTS,
        source_defects=settings.output.source_defects,
        key_images=settings.output.key_images,
        model_repository=settings.triton.model_repository,
    )


def finish_job(folder: Path, settings: Settings) -> None:
    """The input leaves the spool only after every result is on disk."""
    (folder / ENQUEUED_MARKER).unlink(missing_ok=True)
    if settings.worker.archive_inputs:
        dest = settings.archive_dir / folder.name
        if dest.exists():
            shutil.rmtree(dest)
        move_into(folder, settings.archive_dir)
    else:
        shutil.rmtree(folder)
