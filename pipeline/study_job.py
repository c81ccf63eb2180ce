"""One DICOM study, start to finish: series -> routing -> volumes -> Triton -> results.

Each series in the study is routed on its header facts (and the AE titles it came with); a
series no rule matches is recorded as skipped. Each routed series becomes a volume
(:mod:`pipeline.series`) and goes to its rule's models. Results:
``data/results/<StudyInstanceUID>/<model>/<SeriesInstanceUID>/result.json`` and
``data/results/<StudyInstanceUID>/study.json`` listing every series and what became of it.
A series that fails (unreadable, gaps, wrong model) does not stop the others; the job then
ends in ``data/failed/`` with the reasons, its instances kept, the other series' results
written. A transient error (Triton down) retries the whole study.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
from monai.data import MetaTensor

from pipeline import routing, series
from pipeline.contract import InputKind
from pipeline.convert import MAX_VOXELS, LoadedImage
from pipeline.errors import InputError, PermanentError, PipelineError, TransientError
from pipeline.fsutil import atomic_write_bytes
from pipeline.jobs import Job, job_dir, now
from pipeline.processing import Models, StageError, finish_job, run_model
from pipeline.results import InputInfo, SeriesOutcome, StudyResult
from pipeline.settings import Settings
from pipeline.triton_client import TritonClient

log = logging.getLogger(__name__)


def run_study(job: Job, settings: Settings, models: Models, client: TritonClient) -> list[Path]:
    folder = job_dir(settings.spool_dir, job.id)
    study_dir = folder / job.input_file
    if job.study is None or not study_dir.is_dir():
        log.info("job %s: already processed, nothing to do", job.id)
        return []
    study = job.study
    started = now()
    try:
        groups, not_images = series.group_series(study_dir.rglob("*.dcm"))
    except OSError as exc:
        raise StageError("load", TransientError(f"cannot read the study: {exc}")) from exc
    out_dir = settings.results_dir / study.study_uid
    outcomes: list[SeriesOutcome] = []
    written: list[Path] = []
    failures: list[str] = []
    for group in groups:
        facts = group.facts(study.calling_aet or "", study.called_aet or "")
        decision = routing.decide(settings.routes, facts)
        outcome = SeriesOutcome(
            series_uid=group.uid,
            modality=group.modality,
            description=group.description,
            slices=group.planes,
            status="skipped",
            route=None,
            models=[],
            reason=None,
        )
        if decision.route is None:
            why = "; ".join(f"{n}: {', '.join(w)}" for n, w in decision.why_not.items())
            outcomes.append(outcome.model_copy(update={"reason": f"no rule matched: {why}"}))
            continue
        route = decision.route
        try:
            files = _series_results(job, group, route, models, client, started, out_dir)
        except TransientError as exc:
            raise StageError("infer", exc) from exc
        except PermanentError as exc:
            failures.append(f"series {group.uid}: {exc}")
            outcomes.append(
                outcome.model_copy(
                    update={
                        "status": "failed",
                        "route": route.name,
                        "models": list(route.models),
                        "reason": str(exc),
                    }
                )
            )
            continue
        written.extend(files)
        outcomes.append(
            outcome.model_copy(
                update={"status": "done", "route": route.name, "models": list(route.models)}
            )
        )
    doc = StudyResult(
        job_id=job.id,
        study_uid=study.study_uid,
        calling_aet=study.calling_aet,
        called_aet=study.called_aet,
        series=outcomes,
        not_images=[f"{s.name}: {s.reason}" for s in not_images],
        finished=now(),
    )
    try:
        written.append(_write_study(out_dir / "study.json", doc))
    except PipelineError as exc:
        raise StageError("write", exc) from exc
    if failures:
        raise StageError("series", InputError("; ".join(failures)))
    finish_job(folder, settings)
    log.info(
        "job %s: study %s, %d series done, %d skipped",
        job.id,
        study.study_uid,
        sum(o.status == "done" for o in outcomes),
        sum(o.status == "skipped" for o in outcomes),
    )
    return written


def _series_results(
    job: Job,
    group: series.SeriesGroup,
    route: routing.Route,
    models: Models,
    client: TritonClient,
    started: datetime,
    out_dir: Path,
) -> list[Path]:
    if group.planes * group.rows * group.cols > MAX_VOXELS:
        raise InputError(f"{group.planes}x{group.rows}x{group.cols} is larger than {MAX_VOXELS}")
    volume = series.load_series(group.paths)
    image = LoadedImage(InputKind.DICOM, MetaTensor(volume.array[np.newaxis], affine=volume.affine))
    contracts = models.for_route(route, image)
    assert job.study is not None
    info = InputInfo(
        source="dicom",
        name=f"{job.study.study_uid}/{group.uid}",
        kind="dicom",
        sha256=None,
        shape=[int(s) for s in image.array.shape],
        study_uid=job.study.study_uid,
        series_uid=group.uid,
        route=route.name,
    )
    return [
        path
        for c in contracts
        for path in run_model(
            job, info, image, c, models, client, started, out_dir / c.name / group.uid
        )
    ]


def _write_study(path: Path, doc: StudyResult) -> Path:
    try:
        atomic_write_bytes(path, (doc.model_dump_json(indent=2) + "\n").encode())
    except OSError as exc:
        raise TransientError(f"cannot write {path}: {exc}") from exc
    return path
