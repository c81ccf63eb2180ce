"""Retention as an operator applies it: `dicom-pipeline prune [--dry-run]` on a data folder
with old and recent items in every area, and work in flight that must never be touched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

DAY = 86400.0


def _aged(path: Path, days: float) -> Path:
    """Give ``path`` and everything under it the modification time of ``days`` ago."""
    when = time.time() - days * DAY
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when), follow_symlinks=False)
    return path


def _item(folder: Path, name: str, days: float, files: dict[str, float] | None = None) -> Path:
    item = folder / name
    item.mkdir(parents=True)
    (item / "data.bin").write_bytes(b"x")
    for rel in files or {}:
        (item / rel).parent.mkdir(parents=True, exist_ok=True)
        (item / rel).write_text("{}")
    _aged(item, days)
    for rel, age in (files or {}).items():
        _aged(item / rel, age)
    return item


def _prune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIPELINE_DATA_DIR=str(tmp_path / "data"))
    env["PIPELINE_CONFIG"] = str(tmp_path / "config.yaml")
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "prune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prune_removes_only_finished_items_past_their_retention(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "retention: {archive_days: 30, results_days: 90, failed_days: null, records_days: 7}\n"
    )
    data = tmp_path / "data"
    old_archive = _item(data / "archive", "20260101T000000Z-aaaaaaaa", 40)
    new_archive = _item(data / "archive", "20261120T000000Z-bbbbbbbb", 3)
    old_study = _item(data / "results", "2.25.1", 120, {"m/s/result.json": 120})
    # A study with a later round: its newest file counts, so it stays.
    again = _item(data / "results", "2.25.2", 120, {"m/s2/result.json": 5})
    failed = _item(data / "failed", "20250101T000000Z-cccccccc", 400)  # kept for ever
    mpps = data / "spool" / ".mpps"
    mpps.mkdir(parents=True)
    old_mpps = mpps / "1.2.3.json"
    old_mpps.write_text("{}")
    _aged(old_mpps, 10)
    new_mpps = mpps / "1.2.4.json"
    new_mpps.write_text("{}")
    # In flight: a year-old study still in the spool and a queued job are never pruned.
    receiving = _item(data / "spool", "2.25.3", 365)
    job = _item(data / "spool", "20250101T000000Z-dddddddd", 365)
    # An earlier run's deletion that a crash interrupted is finished.
    leftover = _item(data / "archive", ".pruning-20250101T000000Z-eeeeeeee", 0)

    listed = _prune(tmp_path, "--dry-run")
    assert listed.returncode == 0, listed.stderr
    for path in (old_archive, old_study, old_mpps):
        assert path.name in listed.stdout
        assert path.exists()  # a dry run removes nothing
    assert "4 item(s) to remove" in listed.stdout  # those three and the leftover

    done = _prune(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4 item(s) removed" in done.stdout
    for gone in (old_archive, old_study, old_mpps, leftover):
        assert not gone.exists(), gone
    for kept in (new_archive, again, failed, new_mpps, receiving, job):
        assert kept.exists(), kept
    assert not list(data.rglob(".pruning-*"))
