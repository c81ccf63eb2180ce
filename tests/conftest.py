"""Shared fixtures: the real services, started by the tests on private sockets and free ports.

Nothing here touches a server the tests did not start: Redis listens on a Unix socket inside
a temporary folder, Triton on loopback ports chosen free at start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from pipeline.core.instances import InstanceUIDs, store_instance
from pipeline.core.jobs import Job, Reason, now
from pipeline.core.routing import Priority
from pipeline.core.sections import TritonSettings
from pipeline.core.settings import Settings
from pipeline.demo.train import build_demo
from pipeline.inference.triton_client import TritonClient
from pipeline.ingest.completion import Completed, close_study
from pipeline.ingest.handover import Producer
from pipeline.runtime import embedded_redis, embedded_triton
from pipeline.runtime.embedded_triton import TritonEndpoints

# Fuzzing (hypothesis): the same examples on every run by default, so a CI run is repeatable;
# HYPOTHESIS_PROFILE=explore draws new ones, many more, to look for new failures.
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", max_examples=5000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Every component a test starts inherits this: no metrics endpoint or status page on the fixed
# default ports (tests own only free ports); the operations test turns them on, on free ports.
for _component in ("RECEIVER", "WATCHER", "WORKER"):
    os.environ[f"PIPELINE_METRICS__{_component}_PORT"] = "0"
os.environ["PIPELINE_WEB__ENABLED"] = "false"

ROOT = Path(__file__).resolve().parent.parent
needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None,
    reason="dcmtk is not installed (apt-get install dcmtk; .ci/run installs it)",
)
MODEL_REPOSITORY = ROOT / "triton_models"


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The project's model repository with demo weights (trained once, then reused)."""
    build_demo(MODEL_REPOSITORY, print)
    return MODEL_REPOSITORY


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def triton(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonEndpoints]:
    settings = make_settings(
        tmp_path_factory.mktemp("triton"), triton={"model_repository": model_repository}
    )
    settings.ensure_dirs()
    proc, endpoints = embedded_triton.start(settings)
    yield endpoints
    proc.stop()


@pytest.fixture
def new_client() -> Iterator[Callable[[str, TritonSettings], TritonClient]]:
    """Makes TritonClients that are closed when the test ends: their gRPC channels and shared
    memory regions are given back then, not whenever the garbage collector gets to them."""
    clients: list[TritonClient] = []

    def make(url: str, settings: TritonSettings) -> TritonClient:
        clients.append(TritonClient(url, settings))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def redis_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings whose broker is a fresh embedded redis-server of this test's own."""
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    proc = embedded_redis.start(settings)
    yield settings
    proc.stop()


def recording_producer(settings: Settings, jobs: list[Job] | None = None) -> Producer:
    """Intake's own producer, its tasks sent into ``jobs`` (no broker): what it queued."""
    queued = jobs if jobs is not None else []

    def send(job: Job) -> Priority:
        queued.append(job)
        return Priority.ROUTINE

    return Producer(settings.spool_dir, send)


def store_files(settings: Settings, folders: list[Path]) -> str:
    """Store the folders' files in the spool as the receiver would; returns the study UID."""
    settings.ensure_dirs()
    study_uid = ""
    for folder in folders:
        for path in sorted(folder.iterdir()):
            ds = dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            uids = InstanceUIDs(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            store_instance(settings.spool_dir, uids, [path.read_bytes()], 0)
    return study_uid


def spool_study(
    settings: Settings, folders: list[Path], calling: str = "CT01", hold_s: float = 0.0
) -> str:
    """Store the folders' files as the receiver would and hand the study over as a job
    (``hold_s``: handed over early, its results held that long)."""
    study_uid = store_files(settings, folders)
    done = Completed(study_uid, Reason.RELEASED, now(), calling, "PIPELINE", hold_s)
    job = close_study(settings.spool_dir, done)
    assert job is not None
    return job.id


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def up_env(tmp_path: Path, model_repository: Path, dicom_port: int) -> dict[str, str]:
    """The environment of a `dicom-pipeline up` a test owns: its own data folder, its own
    configuration file (``tmp_path/config.yaml``, the default rules unless the test writes
    one), the model repository, the receiver on loopback at ``dicom_port``."""
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text("{}\n")
    return dict(
        os.environ,
        PIPELINE_DATA_DIR=str(tmp_path / "data"),
        PIPELINE_TRITON__MODEL_REPOSITORY=str(model_repository),
        PIPELINE_INBOX__SETTLE_SECONDS="0.5",
        PIPELINE_CONFIG=str(config),
        PIPELINE_RECEIVER__HOST="127.0.0.1",
        PIPELINE_RECEIVER__PORT=str(dicom_port),
    )


@contextmanager
def running_up(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`dicom-pipeline up`, ready; stopped with SIGTERM on the way out (log: tmp_path/up.log)."""
    with (tmp_path / "up.log").open("w+") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "up"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: "ready." in (tmp_path / "up.log").read_text(), 300, "`up` to be ready")
            yield up
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                up.kill()
                raise


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples matching ``labels`` at a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def status_json(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))
