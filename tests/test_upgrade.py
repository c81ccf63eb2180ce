"""An upgrade loses nothing: what the previous version left in the spool, in data/failed/, in
the queue and in the results folder (tests/data/previous_version, written by its own code) is
read by this one; and what this one writes and queues is what the previous one reads, since
its models refuse unknown keys and both run side by side during a rolling upgrade."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.jobs import Job, read_job, spool_file
from pipeline.core.settings import Settings
from pipeline.ops import failed
from pipeline.outputs.send.dispatch import Delivery
from pipeline.studies.rounds import earlier_round

from .conftest import make_settings

PREVIOUS = Path(__file__).parent / "data" / "previous_version"


def _keys(doc: Any) -> Any:
    """The shape of a JSON document: its keys, nested, without the values."""
    if isinstance(doc, dict):
        return {k: _keys(v) for k, v in doc.items()}
    return None


def _previous_data(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path / "data")
    shutil.copytree(PREVIOUS, settings.data_dir)
    settings.ensure_dirs()
    return settings


def test_a_job_the_previous_version_spooled_is_read_and_written_alike(tmp_path: Path) -> None:
    settings = _previous_data(tmp_path)
    folder = next(settings.spool_dir.iterdir())
    job = read_job(folder)
    assert (job.source, job.original_name, job.study) == ("inbox", "hand.png", None)
    assert (folder / job.input_file).is_file()

    (settings.inbox_dir / "new.png").write_bytes(b"")
    ours = spool_file(settings.inbox_dir / "new.png", settings.inbox_dir, settings.spool_dir)
    written = json.loads((settings.spool_dir / ours.id / "job.json").read_text())
    assert _keys(written) == _keys(json.loads((folder / "job.json").read_text()))


def test_the_previous_versions_messages_are_taken_and_ours_are_the_same_shape() -> None:
    """A study queued before the upgrade is processed after it; a message queued by an
    upgraded watcher is taken by a worker not yet upgraded, and the other way round."""
    message = json.loads((PREVIOUS / "process-message.json").read_text())
    job = Job.model_validate(message)  # as the worker's task does
    assert job.study is not None and job.study.series == {"2.25.2222": 40}
    assert job.study.hold_until is not None  # early start's grace kept
    assert _keys(job.model_dump(mode="json")) == _keys(message)

    sending = json.loads((PREVIOUS / "send-message.json").read_text())
    delivery = Delivery.model_validate(sending)
    assert delivery.files == ["2.25.1111/sr.dcm"]
    assert _keys(delivery.model_dump(mode="json")) == _keys(sending)


def test_a_study_summarised_by_the_previous_version_is_merged_into_the_next_round(
    tmp_path: Path,
) -> None:
    """More of a study arriving after the upgrade: its earlier round, written by the previous
    version, is read (not taken as unreadable, which would process the new round alone)."""
    settings = _previous_data(tmp_path)
    earlier = earlier_round(settings.results_dir / "2.25.1111" / "study.json")
    assert earlier is not None
    assert earlier.rounds == [earlier.job_id]
    assert [(s.series_uid, s.status) for s in earlier.series] == [("2.25.2222", "done")]


def test_a_job_failed_under_the_previous_version_is_listed_and_retried(tmp_path: Path) -> None:
    settings = _previous_data(tmp_path)
    [item] = failed.items(settings)
    assert (item.kind, item.what) == ("job", "chest.png")
    assert "not a readable image" in str(item.error["message"])

    queued: list[Job] = []

    def enqueue(job: Job) -> bool:
        queued.append(job)
        return True

    said = failed.retry(settings, item, enqueue, print)
    assert "queued again" in said
    [job] = queued
    assert (settings.spool_dir / job.id / "chest.png").is_file()
    assert not item.folder.exists()
