"""Admission by memory: a volume waits until it fits beside those in flight on the machine,
and one that could never fit fails at once, naming the budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.contract import discover_contracts
from pipeline.core.errors import InputError
from pipeline.core.jobs import read_job, spool_file
from pipeline.demo.dicom_series import write_volume_series
from pipeline.demo.synthetic import ct_volume, write_ct_nifti
from pipeline.demo.train import TEST_SEED_BASE
from pipeline.inference.triton_client import TritonClient
from pipeline.ops import status
from pipeline.ops.status import memory
from pipeline.runtime.embedded_triton import TritonEndpoints
from pipeline.studies.admission import Ledger, memory_limit_and_used_mb, volume_cost_mb
from pipeline.studies.file_job import run_job
from pipeline.studies.models import Models
from pipeline.studies.steps import StageError
from pipeline.studies.study_job import run_study
from pipeline.tasks.worker import fail_job

from .conftest import MODEL_REPOSITORY, make_settings, spool_study

# A pool process of another worker holding a reservation until its stdin closes.
_HOLDER = """
import sys
from pathlib import Path
from pipeline.studies.admission import Ledger
with Ledger(Path(sys.argv[1]), int(sys.argv[2])).admitted(sys.argv[3], int(sys.argv[4]), "x"):
    print("holding", flush=True)
    sys.stdin.read()
"""


def _holder(folder: Path, budget: int, job: str, cost: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder), str(budget), job, str(cost)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def _admit_in_thread(ledger: Ledger, cost: int) -> threading.Event:
    entered = threading.Event()

    def run() -> None:
        with ledger.admitted("waiting-job", cost, "a series of 600x512x512"):
            entered.set()

    threading.Thread(target=run, daemon=True).start()
    return entered


def test_a_volume_waits_until_it_fits_beside_those_in_flight(tmp_path: Path) -> None:
    """Two other processes take 700 of a 1,000 MB budget: a 400 MB volume waits until one of
    them is done, or dies (its reservation is not counted once its process is gone)."""
    folder = tmp_path / "ledger"
    first = _holder(folder, 1000, "job-a", 400)
    second = _holder(folder, 1000, "job-b", 300)
    ledger = Ledger(folder, 1000)
    entered = _admit_in_thread(ledger, 400)
    assert not entered.wait(1.5)  # 700 + 400 > 1,000
    assert first.stdin is not None
    first.stdin.close()  # job-a done
    first.wait(10)
    assert entered.wait(5)
    assert sorted(ledger.reserved().values()) == [300]  # job-b; the thread has left too

    entered = _admit_in_thread(ledger, 800)
    assert not entered.wait(1.5)
    os.kill(second.pid, signal.SIGKILL)  # a pool process killed mid-study
    second.wait(10)
    assert entered.wait(5)


def test_a_volume_larger_than_the_budget_fails_at_once_naming_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger", 1000)
    t0 = time.monotonic()
    with (
        pytest.raises(InputError, match=r"1200 MB .* memory budget for studies, 1000 MB") as err,
        ledger.admitted("job", 1200, "a series of 800x512x512"),
    ):
        pass
    assert time.monotonic() - t0 < 1.0
    assert "worker.memory_budget_mb" in str(err.value)


def test_the_budget_is_measured_while_idle_and_reported(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    limit, used = memory_limit_and_used_mb()
    report = memory(settings)
    assert report is not None
    assert report.limit_mb == limit and 0 < report.idle_mb <= limit
    assert abs(report.budget_mb - (int(0.9 * limit) - used)) < 0.05 * limit  # moments apart
    assert (report.volumes, report.in_flight_mb) == (0, 0)
    assert "budget for studies" in report.line and "in use while idle" in report.line
    assert volume_cost_mb(2000 * 512 * 512) == 6001  # 3x the 2,000 MB float32 volume
    # Where the ledger cannot be used (a read-only data folder; here a file in its place),
    # status leaves the line out and shows the rest.
    other = make_settings(tmp_path / "other")
    other.ensure_dirs()
    (other.data_dir / "memory").write_text("not a folder")
    assert memory(other) is None
    assert status.snapshot(other).memory is None


def test_a_series_beyond_the_budget_fails_the_study_with_the_budget_in_its_reason(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    vol, affine = ct_volume(True, TEST_SEED_BASE + 501)
    ct = write_volume_series(tmp_path / "ct", vol.astype(np.float32), affine)
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        worker={"memory_budget_mb": 1},
    )
    job = read_job(settings.spool_dir / spool_study(settings, [tmp_path / "ct"]))
    models = Models(discover_contracts(MODEL_REPOSITORY))
    with pytest.raises(StageError, match="memory budget"):
        run_study(job, settings, models, new_client(triton.grpc, settings.triton))
    study = json.loads((settings.results_dir / ct.study_uid / "study.json").read_text())
    (series,) = study["series"]
    assert series["status"] == "failed"
    assert "1 MB (worker.memory_budget_mb)" in series["reason"]
    assert (settings.spool_dir / job.id / "study").is_dir()  # the input kept


def test_a_dropped_volume_beyond_the_budget_fails_and_is_kept(
    triton: TritonEndpoints, tmp_path: Path, new_client: Callable[..., TritonClient]
) -> None:
    """A NIfTI dropped into the inbox is admitted as a series is, by the size its header
    gives: beyond the budget, the job fails at the load stage with the budget named, and the
    file is kept in failed/ for a retry."""
    settings = make_settings(
        tmp_path / "data",
        triton={"model_repository": MODEL_REPOSITORY},
        worker={"memory_budget_mb": 1},
    )
    settings.ensure_dirs()
    write_ct_nifti(settings.inbox_dir / "chest.nii.gz", positive=True, seed=TEST_SEED_BASE + 502)
    job = spool_file(settings.inbox_dir / "chest.nii.gz", settings.inbox_dir, settings.spool_dir)
    models = Models(discover_contracts(MODEL_REPOSITORY))
    with pytest.raises(StageError, match=r"an input of \d+x\d+x\d+ needs about") as err:
        run_job(job, settings, models, new_client(triton.grpc, settings.triton))
    assert err.value.stage == "load" and "1 MB (worker.memory_budget_mb)" in str(err.value)
    fail_job(job, settings, err.value.error, err.value.stage)  # what the task does
    assert (settings.failed_dir / job.id / "chest.nii.gz").is_file()
    error = json.loads((settings.failed_dir / job.id / "error.json").read_text())
    assert "memory budget" in json.dumps(error)
