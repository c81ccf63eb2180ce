"""Inputs no routing rule takes: what the ``unrouted`` setting does with them, and their record.

A PACS forwards every study of a modality, often every study, and most match no model: that is
expected, not a failure. Each such job (a study none of whose series a rule takes, or an inbox
file no rule takes) is one line in ``data/unrouted/<YYYY-MM-DD>.jsonl`` (UTC days), whatever
the policy:

- ``ignore``: its input is archived or removed like a processed one's;
- ``keep``: its input is kept in ``data/unrouted/<job id>/`` until a rule takes it
  (``dicom-pipeline unrouted retry``);
- ``fail``: it is a failure in ``data/failed/``, with the reasons no rule matched.

The lines carry UIDs, modalities, SOP classes and the reasons, never patient data.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.core.fsutil import fsync_dir

Policy = Literal["ignore", "keep", "fail"]
RECORD_FILE = "unrouted.json"  # in a kept item's folder: its ledger entry


class Item(BaseModel):
    """One series (or one inbox file) no rule takes."""

    model_config = ConfigDict(frozen=True)

    what: str  # the series UID, or the inbox file's name
    kind: str  # dicom | nifti | image
    modality: str = ""
    sop_class: str = ""
    reason: str = ""


class Entry(BaseModel):
    """One job no rule takes: a line of the day's record."""

    time: datetime
    job: str
    source: str  # dicom | inbox
    study: str | None = None  # StudyInstanceUID, for a study
    name: str | None = None  # the inbox name, for a file
    policy: Policy
    items: list[Item]

    @property
    def modalities(self) -> list[str]:
        return sorted({i.modality or i.kind for i in self.items})


def day_file(folder: Path, day: date) -> Path:
    return folder / f"{day.isoformat()}.jsonl"


def record(folder: Path, entry: Entry) -> None:
    """Append one line to the day's file. One ``write`` on a file opened for appending: lines
    from several workers never interleave, and a crash leaves at most a partial last line
    (which readers skip)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = day_file(folder, entry.time.astimezone(UTC).date())
    new = not path.exists()
    line = entry.model_dump_json() + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(folder)


def entries(folder: Path, day: date) -> list[Entry]:
    """The day's entries, oldest first; a partial or unreadable line is skipped."""
    try:
        lines = day_file(folder, day).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            found.append(Entry.model_validate_json(line))
        except ValueError:
            continue
    return found


def summary(folder: Path, day: date) -> tuple[int, dict[str, int]]:
    """How many jobs no rule took that day, and how many series or files by modality (or
    kind, for files that are no DICOM), most first."""
    found = entries(folder, day)
    by = Counter(i.modality or i.kind for e in found for i in e.items)
    return len(found), dict(by.most_common())


def kept(folder: Path) -> list[Path]:
    """The kept items' folders, oldest first (job ids start with the arrival time)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_entry(item: Path) -> Entry:
    return Entry.model_validate(json.loads((item / RECORD_FILE).read_text()))
