"""One DICOM study, start to finish: series -> routing -> volumes -> Triton -> results.

Each series in the study is routed on its header facts (and the AE titles it came with); a
series no rule matches is recorded as skipped. Each routed series becomes a volume
(:mod:`pipeline.convert.series`) and goes to its rule's models, or, where its rule says
``per_image``, each of its images does (:mod:`pipeline.studies.per_image`). Results:
``data/results/<StudyInstanceUID>/<model>/<SeriesInstanceUID>/result.json`` and
``data/results/<StudyInstanceUID>/study.json`` listing every series and what became of it.
A series that fails (unreadable, gaps, wrong model) does not stop the others; the job then
ends in ``data/failed/`` with the reasons, its instances kept, the other series' results
written. A transient error (Triton down) retries the whole study.

A round runs in named steps: gather its series, process each, check whether it was superseded
(:mod:`pipeline.studies.rounds`), build the study document, publish (write, then send). Its
results are made in memory and written only at the end, so a superseded round writes nothing.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pipeline.convert import grouping
from pipeline.convert.headers import Skipped
from pipeline.convert.images import MAX_VOXELS, Preprocessing
from pipeline.core import observe, routing
from pipeline.core.contract import Task
from pipeline.core.errors import InputError, PermanentError, PipelineError, TransientError
from pipeline.core.instances import inbox_files
from pipeline.core.jobs import Job, Reason, job_dir, now
from pipeline.core.results import InputInfo, SeriesOutcome, StudyResult
from pipeline.core.routing import Route
from pipeline.core.settings import Settings
from pipeline.core.unrouted import Item
from pipeline.inference.triton_client import TritonClient
from pipeline.outputs.files import IncompleteOutputsError, Output, gathered, write_outputs
from pipeline.studies.admission import Ledger, volume_cost_mb
from pipeline.studies.inputs import series_input
from pipeline.studies.model_run import infer_model
from pipeline.studies.models import Models, why_not
from pipeline.studies.per_image import image_results
from pipeline.studies.rounds import (
    SUPERSEDED,
    earlier_instances,
    earlier_round,
    round_lock,
    superseded,
)
from pipeline.studies.steps import Dispatch, StageError, dicom_outputs, finish_job
from pipeline.studies.unrouted import set_aside

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
_INSTANCE = re.compile(r"instance ([0-9.]+):")  # as pipeline.convert.series names an instance


def run_study(
    job: Job,
    settings: Settings,
    models: Models,
    client: TritonClient,
    dispatch: Dispatch | None = None,
) -> list[Path]:
    if job.study is None:  # never for a valid DICOM job (Job's validator)
        log.info("job %s: no study, nothing to do", job.id)
        return []
    with round_lock(settings, job.study.study_uid):
        # Checked under the lock: the same job, delivered twice, may have been done meanwhile.
        if not (job_dir(settings.spool_dir, job.id) / job.input_file).is_dir():
            log.info("job %s: already processed, nothing to do", job.id)
            return []
        return _run_round(job, settings, models, client, dispatch)


@dataclass
class _Gathered:
    """A round's series (with the earlier rounds' instances of the series it touches), the
    files that are no images, and for a study dropped into the inbox its files' names."""

    groups: list[grouping.SeriesGroup]
    not_images: list[Skipped]
    names: dict[str, str]


@dataclass
class _Made:
    """What a round made of its series, in memory until it is published."""

    outcomes: list[SeriesOutcome] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    to_send: list[tuple[Route, list[Path]]] = field(default_factory=list)
    unrouted: list[Item] = field(default_factory=list)  # the series no rule takes


def _run_round(
    job: Job, settings: Settings, models: Models, client: TritonClient, dispatch: Dispatch | None
) -> list[Path]:
    assert job.study is not None
    study = job.study
    out_dir = settings.results_dir / study.study_uid
    earlier = earlier_round(out_dir / STUDY_FILE)
    started = now()
    gathered = _gather(job, settings, earlier)
    made = _Made()
    for group in gathered.groups:
        _process_series(job, group, gathered.names, settings, models, client, started, made)
    if superseded(job, settings):
        made = _superseded_round(job, made)
    elif not made.failures and not any(o.status == "done" for o in made.outcomes):
        # Nothing a rule takes: the unrouted policy's, unless a file is broken (then it is
        # a failure as any other when dropped on purpose) or the study has results already.
        if earlier is None and not any(s.broken for s in gathered.not_images):
            set_aside(job, settings, made.unrouted + [_not_image(s) for s in gathered.not_images])
            return []
        if study.completed_by == Reason.INBOX:
            made.failures = [_nothing_to_process(made, gathered)]
    doc = _study_document(job, earlier, made, gathered)
    written = _publish(made, (out_dir / STUDY_FILE, doc), dispatch)
    if made.failures:
        raise StageError("series", InputError("; ".join(made.failures)))
    finish_job(job_dir(settings.spool_dir, job.id), settings)
    log.info(
        "job %s: study %s, %d series done, %d skipped",
        job.id,
        study.study_uid,
        sum(o.status == "done" for o in doc.series),
        sum(o.status == "skipped" for o in doc.series),
    )
    return written


def _gather(job: Job, settings: Settings, earlier: StudyResult | None) -> _Gathered:
    """The round's instances, and the earlier rounds' of the series it touches (newest
    wins), grouped into series."""
    assert job.study is not None
    study_dir = job_dir(settings.spool_dir, job.id) / job.input_file
    try:
        current = {p.stem: p for p in study_dir.rglob("*.dcm")}
        touched = {p.parent.name for p in current.values()}  # series with new instances
        if earlier is not None:  # and those an earlier round left to this one
            touched |= {o.series_uid for o in earlier.series if o.status == "superseded"}
        merged = earlier_instances(settings, earlier, touched) | current
        groups, not_images = grouping.group_series(merged.values())
        inbox = job.study.completed_by == Reason.INBOX
        return _Gathered(groups, not_images, inbox_files(study_dir) if inbox else {})
    except OSError as exc:
        raise StageError("load", TransientError(f"cannot read the study: {exc}")) from exc


def _process_series(
    job: Job,
    group: grouping.SeriesGroup,
    names: dict[str, str],
    settings: Settings,
    models: Models,
    client: TritonClient,
    started: datetime,
    made: _Made,
) -> None:
    """One series: routed, processed, its outcome recorded; a series that fails does not stop
    the others, a transient error stops the round (it is retried whole)."""
    assert job.study is not None
    facts = group.facts(job.study.calling_aet or "", job.study.called_aet or "")
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
    if (route := decision.route) is None:
        reason = f"no rule matched: {why_not(decision)}"
        made.outcomes.append(outcome.model_copy(update={"reason": reason}))
        made.unrouted.append(
            Item(
                what=group.uid,
                kind="dicom",
                modality=group.modality,
                sop_class=group.sop_class,
                reason=reason,
            )
        )
        return
    routed = {"route": route.name, "models": list(route.models)}
    try:
        files = _series_results(job, group, route, settings, models, client, started)
    except TransientError as exc:
        raise StageError("infer", exc) from exc
    except PermanentError as exc:
        if isinstance(exc, IncompleteOutputsError):  # the result stands; an object was withheld
            made.outputs.extend(exc.outputs)
            made.to_send.append((route, [p for p, _ in exc.outputs if p.suffix == ".dcm"]))
        why = _with_names(str(exc), names)
        made.failures.append(f"series {group.uid}: {why}")
        failed = {"status": "failed", **routed, "reason": why}
        made.outcomes.append(outcome.model_copy(update=failed))
        return
    made.outputs.extend(files)
    made.to_send.append((route, [p for p, _ in files if p.suffix == ".dcm"]))
    made.outcomes.append(outcome.model_copy(update={"status": "done", **routed}))


def _superseded_round(job: Job, made: _Made) -> _Made:
    """More of the study came: nothing of this round is written, its series are left to the
    next round."""
    assert job.study is not None
    left: dict[str, object] = {
        "status": "superseded",
        "route": None,
        "models": [],
        "reason": SUPERSEDED,
    }
    uid = job.study.study_uid
    log.info("job %s: more of study %s arrived; left to the next round", job.id, uid)
    observe.stage("superseded", job=job.id, study=uid, series=len(made.outcomes))
    return _Made(outcomes=[o.model_copy(update=left) for o in made.outcomes])


def _not_image(skipped: Skipped) -> Item:
    return Item(
        what=skipped.name,
        kind="dicom",
        modality=skipped.modality,
        sop_class=skipped.sop_class,
        reason=skipped.reason,
    )


def _nothing_to_process(made: _Made, gathered: _Gathered) -> str:
    """Dropped into the inbox on purpose, as a single file no rule matches would be: an error
    with the reasons (a PACS's study with nothing to process is only recorded)."""
    reasons = [f"series {o.series_uid}: {o.reason}" for o in made.outcomes if o.reason]
    names = gathered.names
    reasons += [f"{_file_name(s.name, names)}: {s.reason}" for s in gathered.not_images]
    return f"nothing to process: {'; '.join(reasons) or 'no image'}"


def _study_document(
    job: Job, earlier: StudyResult | None, made: _Made, gathered: _Gathered
) -> StudyResult:
    """study.json: every series of the study and what became of it; series this round did
    not touch keep their earlier outcome."""
    assert job.study is not None
    outcomes = made.outcomes
    if earlier is not None:
        done = {o.series_uid for o in outcomes}
        outcomes = [o for o in earlier.series if o.series_uid not in done] + outcomes
    return StudyResult(
        job_id=job.id,
        priority=job.priority,
        rounds=[*(earlier.rounds if earlier else []), job.id],
        study_uid=job.study.study_uid,
        calling_aet=job.study.calling_aet,
        called_aet=job.study.called_aet,
        completed_by=job.study.completed_by,
        series=outcomes,
        not_images=[f"{s.name}: {s.reason}" for s in gathered.not_images],
        finished=now(),
    )


def _publish(
    made: _Made, summary: tuple[Path, StudyResult], dispatch: Dispatch | None
) -> list[Path]:
    """The results written, study.json last, and sent: what was made is sent even when
    another series failed."""
    path, doc = summary
    try:
        last = (path, (doc.model_dump_json(indent=2) + "\n").encode())
        written = write_outputs(made.outputs, last=last)
    except PipelineError as exc:
        raise StageError("write", exc) from exc
    try:
        if dispatch is not None:
            for route, paths in made.to_send:
                dispatch(route, paths)
    except PipelineError as exc:
        raise StageError("dispatch", exc) from exc
    return written


def _with_names(text: str, names: dict[str, str]) -> str:
    """The loader names instances by UID; a user who dropped files knows them by name."""
    if not names:
        return text
    return _INSTANCE.sub(
        lambda m: f"instance {m[1]} (file {names[m[1]]}):" if m[1] in names else m[0], text
    )


def _file_name(name: str, names: dict[str, str]) -> str:
    """``<SOP>.dcm`` as the inbox file it came from, where known."""
    return f"file {names[stem]}" if (stem := Path(name).stem) in names else name


def _series_results(
    job: Job,
    group: grouping.SeriesGroup,
    route: routing.Route,
    settings: Settings,
    models: Models,
    client: TritonClient,
    started: datetime,
) -> list[Output]:
    if route.per_image:
        return image_results(job, group, route, settings, models, client, started)
    if group.planes * group.rows * group.cols > MAX_VOXELS:
        raise InputError(f"{group.planes}x{group.rows}x{group.cols} is larger than {MAX_VOXELS}")
    ledger = Ledger.for_host(settings.data_dir, settings.worker.memory_budget_mb)
    cost = volume_cost_mb(group.planes * group.rows * group.cols)
    what = f"a series of {group.planes}x{group.rows}x{group.cols}"
    with ledger.admitted(job.id, cost, what):
        return _volume_results(job, group, route, settings, models, client, started)


def _volume_results(
    job: Job,
    group: grouping.SeriesGroup,
    route: routing.Route,
    settings: Settings,
    models: Models,
    client: TritonClient,
    started: datetime,
) -> list[Output]:
    loading = time.perf_counter()
    image, sources = series_input(group, models, route)
    assert job.study is not None
    observe.stage(
        "loaded",
        job=job.id,
        study=job.study.study_uid,
        seconds=time.perf_counter() - loading,
        series=group.uid,
        slices=group.planes,
    )
    contracts = models.for_route(route, image)
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
    dicom = dicom_outputs(settings, job, route, sources, group.uid)
    out_dir = settings.results_dir / job.study.study_uid
    # Each model's outputs (SR, SEG, preview, mask file: mostly Python) are built in a second
    # thread while the next model waits on Triton, one at a time. The series then takes its
    # models' inference plus the last model's outputs, so segmentation models (SEG, mask and
    # an SR with a group per lesion) go first and a classifier's small outputs last. Within
    # the series only: their validation switches pydicom's reading mode for the whole
    # process, which must not reach the next series' loading. The classifiers' small inputs
    # are made first, so that the preprocessed volume they share with a segmentation is gone
    # once its window has run (the peak of a big CT: docs/benchmarks.md).
    order = sorted(range(len(contracts)), key=lambda i: contracts[i].task is not Task.SEGMENTATION)
    prep = Preprocessing(image, contracts)
    del image  # prep.image from here: its voxels may be compacted once preprocessed
    prep.prepare([c for c in contracts if c.task is not Task.SEGMENTATION])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outputs") as builder:
        built: dict[int, Future[list[Output]]] = {}
        for i in order:
            c = contracts[i]
            where = out_dir / c.name / group.uid
            finish = infer_model(job, info, prep, c, client, started, where, dicom)
            built[i] = builder.submit(finish)
        return gathered(built[i].result for i in range(len(contracts)))  # route's order
