"""A study processed again from its archived inputs, no PACS involved (`dicom-pipeline
rerun`): every instance of every round the study's ``study.json`` lists, the newest copy of
each, copied (the archive is kept) into the study's spool folder and handed over as a
complete study. Its results supersede the earlier ones, as a round with more instances does."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.instances import (
    INCOMING,
    InvalidUIDError,
    adopt_instance,
    check_uid,
    file_identity,
)
from pipeline.core.jobs import STUDY_FOLDER, Job, Reason
from pipeline.core.results import StudyResult
from pipeline.core.settings import Settings
from pipeline.ingest.completion import Completed
from pipeline.ingest.pull.run import Close


def archived_instances(settings: Settings, study_uid: str) -> dict[str, Path]:
    """The study's archived instances by SOP Instance UID, later rounds winning; InputError
    when the study has no results or nothing of it is archived."""
    try:
        uid = check_uid(study_uid, "StudyInstanceUID")
    except InvalidUIDError as exc:
        raise InputError(str(exc)) from None
    summary = settings.results_dir / uid / "study.json"
    try:
        rounds = StudyResult.model_validate_json(summary.read_text()).rounds
    except FileNotFoundError:
        raise InputError(f"no results for study {uid}: nothing to run again") from None
    found: dict[str, Path] = {}
    for job_id in rounds:
        for base in (settings.archive_dir, settings.failed_dir):
            folder = base / job_id / STUDY_FOLDER
            found.update({p.stem: p for p in sorted(folder.glob("*/*.dcm"))})
    if not found:
        raise InputError(
            f"study {uid}: none of its inputs is archived (worker.archive_inputs off, or "
            "retention.archive_days has pruned them); pull it from the PACS instead"
        )
    return found


def rerun_study(settings: Settings, study_uid: str, close: Close) -> Job:
    """Copy the study's archived instances into the spool and hand it over as complete."""
    instances = archived_instances(settings, study_uid)
    spool = settings.spool_dir
    incoming = spool / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    for sop, path in instances.items():
        uids = file_identity(path)
        if uids is None or uids.study != study_uid:
            continue  # not an instance of this study (a file the inbox took with it)
        tmp = incoming / f"{sop}.rerun"
        shutil.copyfile(path, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        adopt_instance(spool, uids, tmp)
    job = close(Completed(study_uid, Reason.RERUN, datetime.now(UTC), None, None))
    if job is None:
        raise InputError(f"study {study_uid}: no instance of it could be handed over")
    return job
