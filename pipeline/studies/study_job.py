"""One DICOM study, start to finish: series -> routing -> volumes -> Triton -> results.

Each series in the study is routed on its header facts (and the AE titles it came with); a
series no rule matches is recorded as skipped. Each routed series becomes a volume
(:mod:`pipeline.convert.series`) and goes to its rule's models. Results:
``data/results/<StudyInstanceUID>/<model>/<SeriesInstanceUID>/result.json`` and
``data/results/<StudyInstanceUID>/study.json`` listing every series and what became of it.
A series that fails (unreadable, gaps, wrong model) does not stop the others; the job then
ends in ``data/failed/`` with the reasons, its instances kept, the other series' results
written. A transient error (Triton down) retries the whole study.

Rounds of one study (instances that came after it was handed over) are processed one at a
time, under a lock, because each reads and extends the study's ``study.json``. A round handed
over early (``hold_until``, see :mod:`pipeline.ingest.completion`) makes its results in memory,
waits until that time and then looks for more of the study in the spool: if there is, it writes no
result, marks its series ``superseded`` and leaves them to the next round, which processes
them together with the new instances, as if they had all come within the grace period.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path

from pipeline.convert import grouping
from pipeline.convert.images import MAX_VOXELS, Preprocessing
from pipeline.core import observe, routing
from pipeline.core.contract import Task
from pipeline.core.errors import InputError, PermanentError, PipelineError, TransientError
from pipeline.core.fsutil import flocked
from pipeline.core.instances import SUFFIX, inbox_files
from pipeline.core.jobs import STUDY_FOLDER, Job, Reason, is_job_id, job_dir, now, read_job
from pipeline.core.results import InputInfo, SeriesOutcome, StudyResult
from pipeline.core.settings import Settings
from pipeline.inference.triton_client import TritonClient
from pipeline.studies.file_job import (
    Dispatch,
    Models,
    Output,
    StageError,
    dicom_outputs,
    finish_job,
    infer_model,
    series_input,
    why_not,
    write_outputs,
)

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
ROUND_LOCKS = ".study-locks"  # in the spool: one lock file per bucket of study UIDs
_INSTANCE = re.compile(r"instance ([0-9.]+):")  # as pipeline.convert.series names an instance
SUPERSEDED = (
    "more instances of the study arrived within the release grace period: this series is "
    "processed again with them in the next round"
)


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
    with _round_lock(settings, job.study.study_uid):
        # Checked under the lock: the same job, delivered twice, may have been done meanwhile.
        if not (job_dir(settings.spool_dir, job.id) / job.input_file).is_dir():
            log.info("job %s: already processed, nothing to do", job.id)
            return []
        return _run_round(job, settings, models, client, dispatch)


def _run_round(
    job: Job,
    settings: Settings,
    models: Models,
    client: TritonClient,
    dispatch: Dispatch | None,
) -> list[Path]:
    assert job.study is not None
    folder = job_dir(settings.spool_dir, job.id)
    study_dir = folder / job.input_file
    study = job.study
    started = now()
    out_dir = settings.results_dir / study.study_uid
    earlier = _earlier_round(out_dir / STUDY_FILE)
    try:
        current = {p.stem: p for p in study_dir.rglob("*.dcm")}
        touched = {p.parent.name for p in current.values()}  # series with new instances
        if earlier is not None:  # and those an earlier round left to this one
            touched |= {o.series_uid for o in earlier.series if o.status == "superseded"}
        merged = _earlier_instances(settings, earlier, touched) | current  # newest wins
        groups, not_images = grouping.group_series(merged.values())
        names = inbox_files(study_dir) if study.completed_by == Reason.INBOX else {}
    except OSError as exc:
        raise StageError("load", TransientError(f"cannot read the study: {exc}")) from exc
    outcomes: list[SeriesOutcome] = []
    outputs: list[Output] = []
    failures: list[str] = []
    to_send: list[tuple[routing.Route, list[Path]]] = []
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
            why = why_not(decision)
            outcomes.append(outcome.model_copy(update={"reason": f"no rule matched: {why}"}))
            continue
        route = decision.route
        try:
            files = _series_results(job, group, route, settings, models, client, started)
        except TransientError as exc:
            raise StageError("infer", exc) from exc
        except PermanentError as exc:
            why = _with_names(str(exc), names)
            failures.append(f"series {group.uid}: {why}")
            outcomes.append(
                outcome.model_copy(
                    update={
                        "status": "failed",
                        "route": route.name,
                        "models": list(route.models),
                        "reason": why,
                    }
                )
            )
            continue
        outputs.extend(files)
        to_send.append((route, [p for p, _ in files if p.suffix == ".dcm"]))
        outcomes.append(
            outcome.model_copy(
                update={"status": "done", "route": route.name, "models": list(route.models)}
            )
        )
    if _superseded(job, settings):
        left: dict[str, object] = {
            "status": "superseded",
            "route": None,
            "models": [],
            "reason": SUPERSEDED,
        }
        outcomes = [o.model_copy(update=left) for o in outcomes]
        outputs, to_send, failures = [], [], []
        log.info(
            "job %s: more of study %s arrived; left to the next round", job.id, study.study_uid
        )
        observe.stage("superseded", job=job.id, study=study.study_uid, series=len(outcomes))
    elif study.completed_by == Reason.INBOX and not any(o.status == "done" for o in outcomes):
        # Dropped into the inbox on purpose, as a single file no rule matches would be: an
        # error with the reasons (a PACS's study with nothing to process is only recorded).
        reasons = [f"series {o.series_uid}: {o.reason}" for o in outcomes if o.reason]
        reasons += [f"{_file_name(s.name, names)}: {s.reason}" for s in not_images]
        if not failures:
            failures = [f"nothing to process: {'; '.join(reasons) or 'no image'}"]
    if earlier is not None:  # series this round did not touch keep their earlier outcome
        done = {o.series_uid for o in outcomes}
        outcomes = [o for o in earlier.series if o.series_uid not in done] + outcomes
    doc = StudyResult(
        job_id=job.id,
        priority=job.priority,
        rounds=[*(earlier.rounds if earlier else []), job.id],
        study_uid=study.study_uid,
        calling_aet=study.calling_aet,
        called_aet=study.called_aet,
        series=outcomes,
        not_images=[f"{s.name}: {s.reason}" for s in not_images],
        finished=now(),
    )
    try:
        summary = (out_dir / STUDY_FILE, (doc.model_dump_json(indent=2) + "\n").encode())
        written = write_outputs(outputs, last=summary)
    except PipelineError as exc:
        raise StageError("write", exc) from exc
    try:  # what was made is sent, even when another series failed
        if dispatch is not None:
            for route, paths in to_send:
                dispatch(route, paths)
    except PipelineError as exc:
        raise StageError("dispatch", exc) from exc
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


def _round_lock(settings: Settings, study_uid: str) -> AbstractContextManager[None]:
    """Held while a round runs. 256 lock files whatever the number of studies: two studies
    that share one only take turns."""
    bucket = hashlib.sha256(study_uid.encode()).hexdigest()[:2]
    locks = settings.spool_dir / ROUND_LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    return flocked(locks / f"{bucket}.lock")


def _superseded(job: Job, settings: Settings) -> bool:
    """For a round handed over early: wait until its hold time, then tell whether more of its
    study is in the spool (being received, or a later round waiting). Without an archive the
    round's instances would be gone before the next round could use them: it then stands."""
    assert job.study is not None
    if job.study.hold_until is None or not settings.worker.archive_inputs:
        return False
    if (wait := (job.study.hold_until - now()).total_seconds()) > 0:
        time.sleep(wait)
    spool, uid = settings.spool_dir, job.study.study_uid
    if any((spool / uid).glob(f"*/*{SUFFIX}")):
        return True
    for entry in spool.iterdir():
        if entry.name == job.id or not is_job_id(entry.name):
            continue
        try:
            other = read_job(entry)
        except (OSError, ValueError):
            continue  # finished and moved meanwhile, or half-made (then not yet ours to see)
        if other.study is not None and other.study.study_uid == uid:
            return True
    return False


def _earlier_round(path: Path) -> StudyResult | None:
    try:
        return StudyResult.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): this round is processed on its own", path, exc)
        return None


def _earlier_instances(
    settings: Settings, earlier: StudyResult | None, series_uids: set[str]
) -> dict[str, Path]:
    """Instances of the touched series from the study's earlier rounds (kept in the archive),
    by SOP Instance UID (the receiver names files by it); oldest first, so later rounds win.

    A late instance thus joins its series instead of being processed alone."""
    found: dict[str, Path] = {}
    for job_id in earlier.rounds if earlier else []:
        # A round that failed keeps its instances in failed/ instead of the archive.
        folder = settings.archive_dir / job_id / STUDY_FOLDER
        if not folder.is_dir():
            folder = settings.failed_dir / job_id / STUDY_FOLDER
        for uid in series_uids:
            found.update({p.stem: p for p in (folder / uid).glob("*.dcm")})
    if earlier and not found and series_uids and not settings.worker.archive_inputs:
        log.warning("earlier rounds' instances are not archived: this round stands alone")
    return found


def _series_results(
    job: Job,
    group: grouping.SeriesGroup,
    route: routing.Route,
    settings: Settings,
    models: Models,
    client: TritonClient,
    started: datetime,
) -> list[Output]:
    if group.planes * group.rows * group.cols > MAX_VOXELS:
        raise InputError(f"{group.planes}x{group.rows}x{group.cols} is larger than {MAX_VOXELS}")
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
    # process, which must not reach the next series' loading.
    order = sorted(range(len(contracts)), key=lambda i: contracts[i].task is not Task.SEGMENTATION)
    prep = Preprocessing(image, contracts)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outputs") as builder:
        built: dict[int, Future[list[Output]]] = {}
        for i in order:
            c = contracts[i]
            where = out_dir / c.name / group.uid
            finish = infer_model(job, info, prep, c, client, started, where, dicom)
            built[i] = builder.submit(finish)
        return [o for i in range(len(contracts)) for o in built[i].result()]  # route's order
