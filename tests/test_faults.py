"""Faults injected into a running `dicom-pipeline up`, each with nothing lost and nothing done
twice: Redis stopped for 30 s while studies arrive by C-STORE and into the inbox; Triton killed
(restarted by `up`, its models reloading) while work arrives; the worker's pool processes
killed with SIGKILL in the middle of a study. Also, in-process: the results disk refusing
writes leaves no partial file, and the retry after it succeeds."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.contract import discover_contracts
from pipeline.core.errors import TransientError
from pipeline.core.jobs import spool_file
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import ct_volume, lesion_phantom, write_mednist_png
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.runtime.process import descendants, free_port
from pipeline.studies.file_job import run_job
from pipeline.studies.models import Models
from pipeline.studies.steps import StageError

from .conftest import MODEL_REPOSITORY, make_settings, running_up, up_env, wait_for


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    stat = (Path("/proc") / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _one(pids: Iterable[int], needle: str) -> int:
    (pid,) = [p for p in pids if needle in _cmdline(p)]
    return pid


def _send(folder: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "send", str(folder), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _results(data: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (data / "results").rglob("result.json")]


@pytest.mark.e2e
def test_redis_stopped_triton_killed_worker_killed_nothing_lost(
    model_repository: Path, tmp_path: Path
) -> None:
    data, port = tmp_path / "data", free_port()
    env = up_env(tmp_path, model_repository, port)
    env["PIPELINE_WORKER__RETRY_BACKOFF_MAX_S"] = "5"
    env["PIPELINE_WORKER__MAX_RETRIES"] = "60"
    inbox, staging = data / "inbox", tmp_path / "staging"
    staging.mkdir()

    def drop(name: str, label: str, seed: int) -> None:
        write_mednist_png(staging / name, label, seed)
        os.replace(staging / name, inbox / name)

    with running_up(tmp_path, env) as up:
        pids = descendants(up.pid)
        redis_pid = _one(pids, "redis-server")

        # 1. Redis stopped for 30 s while a study arrives by C-STORE and files into the inbox.
        vol, affine = ct_volume(True, TEST_SEED_BASE + 700)
        study_a = write_volume_series(tmp_path / "study-a", vol.astype(np.float32), affine)
        os.kill(redis_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            sent = _send(tmp_path / "study-a", port)
            assert sent.returncode == 0, sent.stderr  # every instance acknowledged
            for k in range(3):
                drop(f"during-outage-{k}.png", "Hand", TEST_SEED_BASE + 710 + k)
            # Spooled while Redis is stopped: the inbox empties, the study becomes a job.
            wait_for(lambda: not list(inbox.iterdir()), 60, "the inbox files to be spooled")
            wait_for(
                lambda: any(
                    (p / "study").is_dir() for p in (data / "spool").iterdir() if p.is_dir()
                ),
                60,
                "the study to be handed over as a job",
            )
            time.sleep(max(0.0, 30.0 - (time.monotonic() - stopped)))
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        study_dir = data / "results" / study_a.study_uid
        wait_for(lambda: (study_dir / "study.json").exists(), 240, "study A after Redis")
        wait_for(
            lambda: (
                sum(str(r["input"]["name"]).startswith("during-outage") for r in _results(data))  # type: ignore[index]
                == 3
            ),
            120,
            "the inbox files after Redis",
        )

        # 2. Triton killed: `up` restarts it; work that arrives meanwhile is retried.
        os.kill(_one(descendants(up.pid), "tritonserver"), signal.SIGKILL)
        for k in range(2):
            drop(f"during-triton-restart-{k}.png", "CXR", TEST_SEED_BASE + 720 + k)
        wait_for(
            lambda: (
                sum(
                    str(r["input"]["name"]).startswith("during-triton")  # type: ignore[index]
                    for r in _results(data)
                )
                == 2
            ),
            300,
            "the files that arrived while Triton was down",
        )
        worker_log = data / "run" / "logs" / "worker.log"
        assert "retry 1 in" in worker_log.read_text()

        # 3. The worker's pool processes killed in the middle of a study.
        hu, _, affine_b = lesion_phantom(TEST_SEED_BASE + 730, lesions=2)
        study_b = write_volume_series(tmp_path / "study-b", hu.astype(np.float32), affine_b)
        received_before = worker_log.read_text().count("pipeline.process_job[")
        assert _send(tmp_path / "study-b", port).returncode == 0
        wait_for(
            lambda: worker_log.read_text().count("pipeline.process_job[") > received_before,
            60,
            "the worker to take study B",
        )
        workers = [p for p in descendants(up.pid) if "pipeline worker" in _cmdline(p)]
        (worker,) = [p for p in workers if _ppid(p) == up.pid]  # the pool's parent
        pool = [p for p in workers if _ppid(p) == worker]
        assert pool
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        b_dir = data / "results" / study_b.study_uid
        wait_for(lambda: (b_dir / "study.json").exists(), 300, "study B after the kill")
        assert "WorkerLostError" in worker_log.read_text()

        # Nothing lost, nothing twice.
        def spooled() -> list[Path]:
            return [p for p in (data / "spool").iterdir() if not p.name.startswith(".")]

        wait_for(lambda: not spooled(), 60, "the spool to empty")
        results = _results(data)
        names = [str(r["input"]["name"]) for r in results]  # type: ignore[index]
        keys = [(str(r["input"]["name"]), str(r["model"]["name"])) for r in results]  # type: ignore[index]
        assert len(keys) == len(set(keys))  # one result per input and model
        assert sum(n.startswith(study_a.study_uid) for n in names) == 2  # covid + lesions
        assert sum(n.startswith(study_b.study_uid) for n in names) == 2
        study_b_doc = json.loads((b_dir / "study.json").read_text())
        assert len(study_b_doc["rounds"]) == 1  # one job for study B, delivered again
        assert not list((data / "failed").iterdir())
        assert len(list((data / "archive").iterdir())) == 2 + 3 + 2  # studies A, B; 5 files


def test_a_full_results_disk_leaves_no_partial_file_and_the_retry_succeeds(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        output={"iod_check": "strict-read"},  # the writes to results are what fails here
    )
    settings.ensure_dirs()
    write_mednist_png(settings.inbox_dir / "hand.png", "Hand", TEST_SEED_BASE + 740)
    job = spool_file(settings.inbox_dir / "hand.png", settings.inbox_dir, settings.spool_dir)
    models = Models(discover_contracts(MODEL_REPOSITORY))
    client = new_client(triton.grpc, settings.triton)
    # No file may grow past 1 KB in this process: the SR and preview (larger) cannot be
    # written, as on a full disk (EFBIG instead of ENOSPC, the same OSError to the writer).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(StageError) as err:
            run_job(job, settings, models, client)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert isinstance(err.value.error, TransientError)  # the task retries it later
    assert "File too large" in str(err.value)
    out = settings.results_dir / job.id
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in leftovers if p.name.endswith(".tmp")]  # no partial file
    assert not (out / "mednist_classifier" / "result.json").exists()
    assert (settings.spool_dir / job.id / "hand.png").is_file()  # the input waits
    run_job(job, settings, models, client)  # the retry, once space is back
    result = json.loads((out / "mednist_classifier" / "result.json").read_text())
    assert result["prediction"]["label"] == "Hand"
