"""A pull's list of studies, kept in the spool so that an interrupted pull continues where it
stopped: ``spool/pulls/<pull id>.json``, rewritten whole (temporary name, fsync, rename) at
each study's change of state, and its retrieved instances staged in ``spool/pulls/<pull id>/``
until the study is complete."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.core.fsutil import atomic_write_json

PULLS = "pulls"

State = Literal["pending", "done", "skipped", "failed"]


class PulledStudy(BaseModel):
    """One matched study: what the PACS said of it, and how far its retrieve got."""

    model_config = ConfigDict(extra="forbid")

    study_uid: str
    accession: str = ""
    date: str = ""
    modalities: str = ""
    description: str = ""
    expected: int | None = None  # instances, as the PACS counts them
    sop_classes: list[str] = []  # the study's storage classes, where the PACS said them
    state: State = "pending"
    received: int = 0
    job_id: str | None = None
    reason: str | None = None  # skipped or failed: why


class Pull(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    created: datetime
    force: bool = False
    studies: list[PulledStudy] = []

    @property
    def pending(self) -> list[PulledStudy]:
        return [s for s in self.studies if s.state == "pending"]

    def counts(self) -> dict[str, int]:
        out = {state: 0 for state in ("pending", "done", "skipped", "failed")}
        for study in self.studies:
            out[study.state] += 1
        return out


def pulls_dir(spool: Path) -> Path:
    return spool / PULLS


def new_pull(spool: Path, source: str, studies: list[PulledStudy], force: bool) -> Pull:
    at = datetime.now(UTC)
    pull = Pull(
        id=f"{at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
        source=source,
        created=at,
        force=force,
        studies=studies,
    )
    save(spool, pull)
    return pull


def staging(spool: Path, pull: Pull, study_uid: str) -> Path:
    """Where one study's retrieved instances wait until it is complete (``study_uid`` is a
    checked UID)."""
    return pulls_dir(spool) / pull.id / study_uid


def moved_marker(spool: Path, study_uid: str) -> Path:
    """Written before a C-MOVE of the study (``study_uid`` a checked UID): the receiver, which
    gets the instances, closes the study as retrieved rather than as released."""
    return pulls_dir(spool) / "moving" / study_uid


def save(spool: Path, pull: Pull) -> None:
    pulls_dir(spool).mkdir(parents=True, exist_ok=True)
    atomic_write_json(pulls_dir(spool) / f"{pull.id}.json", pull.model_dump(mode="json"))


def load(spool: Path, pull_id: str) -> Pull:
    """A pull by id; FileNotFoundError naming the id when there is none."""
    if not pull_id.replace("-", "").isalnum():
        raise FileNotFoundError(f"no pull {pull_id!r}")
    path = pulls_dir(spool) / f"{pull_id}.json"
    try:
        return Pull.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no pull {pull_id!r} in {pulls_dir(spool)}") from None


def unfinished(spool: Path) -> list[Pull]:
    """Pulls with studies still to retrieve, oldest first (for `status` and `pull --resume`)."""
    found = []
    for path in sorted(pulls_dir(spool).glob("*.json")):
        try:
            pull = Pull.model_validate_json(path.read_text())
        except (OSError, ValueError):
            continue
        if pull.pending:
            found.append(pull)
    return found
