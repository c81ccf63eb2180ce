"""One job, start to finish: load -> preprocess (MONAI) -> Triton -> result.json.

Plain functions over plain values: no Celery here. Failures come out as ``StageError`` naming
the stage, carrying the original error whose class says whether a retry can help.
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pydicom

from pipeline.convert import images as convert
from pipeline.core import routing
from pipeline.core.contract import InputKind
from pipeline.core.errors import OutputError, PipelineError
from pipeline.core.jobs import Job, job_dir, now
from pipeline.core.results import InputInfo
from pipeline.core.routing import SeriesFacts
from pipeline.core.settings import Settings
from pipeline.core.unrouted import Item
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs.files import IncompleteOutputsError, gathered, write_outputs
from pipeline.studies.admission import Ledger, volume_cost_mb
from pipeline.studies.inputs import file_sources, inbox_facts
from pipeline.studies.model_run import infer_model
from pipeline.studies.models import Models, why_not
from pipeline.studies.steps import Dispatch, StageError, dicom_outputs, finish_job
from pipeline.studies.unrouted import set_aside

log = logging.getLogger(__name__)


def run_job(
    job: Job,
    settings: Settings,
    models: Models,
    client: TritonClient,
    dispatch: Dispatch | None = None,
) -> list[Path]:
    """Process a spooled job; returns the result files written. Idempotent: a job whose spool
    folder is gone was finished by an earlier delivery and is skipped. A volume is admitted
    by memory first (:mod:`pipeline.studies.admission`), as a series is."""
    folder = job_dir(settings.spool_dir, job.id)
    if not (folder / job.input_file).exists():
        log.info("job %s: already processed, nothing to do", job.id)
        return []
    # Unknown for a PNG or JPEG (small), or an unreadable file (the load says why).
    shape = convert.voxels_in(folder / job.input_file)
    with ExitStack() as held:
        if shape:
            ledger = Ledger.for_host(settings.data_dir, settings.worker.memory_budget_mb)
            what = "an input of " + "x".join(map(str, shape))  # never its name: maybe a patient's
            try:
                held.enter_context(ledger.admitted(job.id, volume_cost_mb(math.prod(shape)), what))
            except PipelineError as exc:  # larger than the whole budget: fails as a bad input
                raise StageError("load", exc) from exc
        return _run_job(job, settings, models, client, dispatch)


def _run_job(
    job: Job,
    settings: Settings,
    models: Models,
    client: TritonClient,
    dispatch: Dispatch | None,
) -> list[Path]:
    folder = job_dir(settings.spool_dir, job.id)
    started = now()
    stage = "load"
    try:
        path = folder / job.input_file
        image = convert.load(path)
        header = None
        if image.kind is InputKind.DICOM:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        facts = inbox_facts(path, image, header)
        decision = routing.decide(settings.routes, facts)
        if (route := decision.route) is None:
            set_aside(job, settings, [_unrouted(job, facts, why_not(decision))])
            return []
        chosen = models.for_route(route, image)
        info = InputInfo(
            source=job.source,
            name=job.original_name,
            kind=image.kind.value,
            sha256=_sha256(path),
            shape=[int(s) for s in image.array.shape],
            route=route.name,
        )
        dicom = dicom_outputs(settings, job, route, file_sources(header), "")
        stage = "infer"
        out_dir = settings.results_dir / job.id
        prep = convert.Preprocessing(image, chosen)
        run = partial(infer_model, job, info, prep)
        own = None  # a DICOM object withheld for errors of our own: fails after the writing
        try:
            outputs = gathered(run(c, client, started, out_dir / c.name, dicom) for c in chosen)
        except IncompleteOutputsError as exc:
            outputs, own = exc.outputs, str(exc)
        stage = "write"
        written = write_outputs(outputs)
        stage = "dispatch"
        if dispatch is not None:
            dispatch(route, [p for p in written if p.suffix == ".dcm"])
        if own:
            stage = "outputs"
            raise OutputError(own)
    except PipelineError as exc:
        raise StageError(stage, exc) from exc
    finish_job(folder, settings)
    log.info("job %s: %d result file(s) by %s", job.id, len(written), route.name)
    return written


def _unrouted(job: Job, facts: SeriesFacts, why: str) -> Item:
    return Item(
        what=job.original_name or job.input_file,
        kind=facts.kind,
        modality=facts.modality,
        sop_class=facts.sop_class_uid,
        reason=f"no rule matched: {why}",
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
