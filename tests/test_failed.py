"""`dicom-pipeline failed list | show | retry`: a failed item is found, understood, and re-run
after the fix, through the real Redis and Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from pipeline.core.contract import discover_contracts
from pipeline.core.jobs import ENQUEUED_MARKER, JOB_FILE, spool_file
from pipeline.core.routing import Match, Priority, Route
from pipeline.core.settings import Settings
from pipeline.demo.synthetic import write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.ingest.inbox import InboxWatcher
from pipeline.ops.failed import PREVIOUS_ERROR
from pipeline.outputs.send.dispatch import Delivery, record_failure
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.file_job import run_job
from pipeline.studies.models import Models
from pipeline.studies.steps import StageError
from pipeline.tasks import broker
from pipeline.tasks.app import DISPATCH_TASK, QUEUE, TASK_NAME, URGENT_QUEUE
from pipeline.tasks.worker import fail_job

from .conftest import MODEL_REPOSITORY, make_settings, recording_producer


def _cli(settings: Settings, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "none.yaml").write_text("{}\n")
    env = {
        **os.environ,
        "PIPELINE_DATA_DIR": str(settings.data_dir),
        "PIPELINE_CONFIG": str(tmp_path / "none.yaml"),
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "failed", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _queued(settings: Settings, queue: str = QUEUE) -> list[dict[str, object]]:
    client = redis.Redis(unix_socket_path=str(broker.socket_path(settings)))
    return [json.loads(m) for m in client.lrange(queue, 0, -1)]


def test_a_failed_job_is_listed_shown_and_retried_after_the_fix(
    redis_settings: Settings,
    triton: TritonEndpoints,
    tmp_path: Path,
    new_client: Callable[..., TritonClient],
) -> None:
    settings = make_settings(redis_settings.data_dir, triton={"model_repository": MODEL_REPOSITORY})
    # A configuration mistake: the rule names a model Triton does not serve.
    broken = make_settings(
        settings.data_dir,
        triton={"model_repository": MODEL_REPOSITORY},
        routes=[Route(name="xr", match=Match(kind=("image",)), models=("chest_xray_v2",))],
    )
    write_mednist_png(settings.inbox_dir / "hand.png", "Hand", TEST_SEED_BASE + 620)
    job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)
    models = Models(discover_contracts(MODEL_REPOSITORY))
    client = new_client(triton.grpc, settings.triton)
    try:
        run_job(job, broken, models, client)
        raise AssertionError("the job should fail")
    except StageError as exc:
        fail_job(job, broken, exc.error, exc.stage)  # what the task does
    assert (settings.failed_dir / job.id / "hand.png").is_file()

    listed = _cli(settings, tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [li for li in listed.stdout.splitlines() if li.startswith(job.id)]
    assert "job/load" in line and "chest_xray_v2" in line and "[hand.png]" in line

    shown = _cli(settings, tmp_path, "show", job.id)
    assert shown.returncode == 0, shown.stderr
    assert "ModelNotFoundError" in shown.stdout and "  hand.png" in shown.stdout

    # After the fix (the default rules), the operator retries it.
    retried = _cli(settings, tmp_path, "retry", job.id)
    assert retried.returncode == 0, retried.stderr
    assert f"job {job.id} queued again" in retried.stdout
    folder = settings.spool_dir / job.id
    assert (folder / JOB_FILE).is_file() and (folder / ENQUEUED_MARKER).exists()
    assert "chest_xray_v2" in (folder / PREVIOUS_ERROR).read_text()
    assert not (settings.failed_dir / job.id).exists()
    (message,) = _queued(settings)
    assert message["headers"]["id"] == job.id and message["headers"]["task"] == TASK_NAME  # type: ignore[index]
    run_job(job, settings, models, client)  # what the worker does with it
    result = json.loads(
        (settings.results_dir / job.id / "mednist_classifier" / "result.json").read_text()
    )
    assert result["prediction"]["label"] == "Hand"

    again = _cli(settings, tmp_path, "retry", "--all")
    assert again.returncode == 0 and "nothing to retry" in again.stdout
    missing = _cli(settings, tmp_path, "show", "20990101T000000Z-00000000")
    assert missing.returncode == 2 and "no failed item" in missing.stderr


def test_unsent_results_are_queued_again_and_intake_refusals_are_not_retried(
    redis_settings: Settings, tmp_path: Path
) -> None:
    settings = redis_settings
    (settings.results_dir / "study").mkdir(parents=True)
    (settings.results_dir / "study" / "sr.dcm").write_bytes(b"kept in results")
    unsent = Delivery(
        job_id="20261124T000000Z-0000abcd", destination="pacs", files=["study/sr.dcm"]
    )
    record_failure(settings, unsent, {"study/sr.dcm": "pacs still unavailable after 101 attempts"})
    # An urgent route's results: sent ahead again when retried.
    urgent = unsent.model_copy(
        update={"job_id": "20261124T000001Z-0000beef", "priority": Priority.URGENT}
    )
    record_failure(settings, urgent, {"study/sr.dcm": "pacs still unavailable after 101 attempts"})
    (tmp_path / "outside.png").write_bytes(b"x")
    (settings.inbox_dir / "link.png").symlink_to(tmp_path / "outside.png")
    InboxWatcher(settings, recording_producer(settings))._take(settings.inbox_dir / "link.png")
    (refused,) = [p.name for p in settings.failed_dir.iterdir() if ".send-" not in p.name]

    listed = _cli(settings, tmp_path, "list")
    assert "send/dispatch" in listed.stdout and "[1 file(s) to pacs]" in listed.stdout
    assert f"{refused}  " in listed.stdout and "intake/intake" in listed.stdout

    retried = _cli(settings, tmp_path, "retry", "--all")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.count("sending of 1 file(s) queued") == 2
    for queue, delivery in ((QUEUE, unsent), (URGENT_QUEUE, urgent)):
        (message,) = _queued(settings, queue)
        assert message["headers"]["task"] == DISPATCH_TASK  # type: ignore[index]
        assert delivery.job_id in message["headers"]["argsrepr"]  # type: ignore[index]
        assert not (settings.failed_dir / f"{delivery.job_id}.send-pacs").exists()

    not_retryable = _cli(settings, tmp_path, "retry", refused)
    assert not_retryable.returncode == 1 and "nothing to retry" in not_retryable.stderr
    assert (settings.failed_dir / refused / "link.png").is_symlink()  # still kept
