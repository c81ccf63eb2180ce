"""Shared fixtures: the real services, started by the tests on private sockets and free ports.

Nothing here touches a server the tests did not start: Redis listens on a Unix socket inside
a temporary folder, Triton on loopback ports chosen free at start.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.demo.train import build_demo
from pipeline.services import embedded_redis, embedded_triton
from pipeline.services.embedded_triton import TritonEndpoints
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
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
