"""Shared fixtures: the real services, started by the tests on private sockets and free ports.

Nothing here touches a server the tests did not start: Redis listens on a Unix socket inside
a temporary folder, Triton on loopback ports chosen free at start.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from pipeline.demo.train import build_demo
from pipeline.dicom_store import InstanceUIDs, store_instance
from pipeline.jobs import now
from pipeline.services import embedded_redis, embedded_triton
from pipeline.services.embedded_triton import TritonEndpoints
from pipeline.settings import Settings
from pipeline.studies import Completed, Reason, close_study

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
def redis_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings whose broker is a fresh embedded redis-server of this test's own."""
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    proc = embedded_redis.start(settings)
    yield settings
    proc.stop()


def spool_study(settings: Settings, folders: list[Path], calling: str = "CT01") -> str:
    """Store the folders' files as the receiver would and hand the study over as a job."""
    settings.ensure_dirs()
    study_uid = ""
    for folder in folders:
        for path in sorted(folder.iterdir()):
            ds = dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            uids = InstanceUIDs(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            store_instance(settings.spool_dir, uids, path.read_bytes(), 0)
    job = close_study(
        settings.spool_dir, Completed(study_uid, Reason.RELEASED, now(), calling, "PIPELINE")
    )
    assert job is not None
    return job.id
