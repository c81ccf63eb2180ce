"""The worker's warm-up: each pool process runs a study's steps once, without Triton, before
its first job (pipeline.tasks.warmup)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from pipeline.core.contract import discover_contracts
from pipeline.tasks.warmup import warm_up

from .conftest import MODEL_REPOSITORY


def test_warm_up_runs_each_ct_models_steps_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It must keep working as the steps change: in the worker a failure is only logged, and
    the first study would silently pay the first-use costs again."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    contracts = discover_contracts(MODEL_REPOSITORY)
    assert warm_up(contracts.values(), "auto") > 0.0
    assert list(tmp_path.iterdir()) == []
