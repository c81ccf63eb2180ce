"""What the receiving processes tell the receiver's loop (:mod:`pipeline.ingest.receiver`).

The SCP's handlers and STOW-RS requests, in any receiving process, put these small frozen
records to an :class:`EventSink`; further processes send them through a pipe of their own
(pickled). The loop matches them by type and feeds the study tracker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Stored:
    """An instance is in the spool (C-STORE answered success, or a STOW-RS part stored)."""

    study_uid: str
    sop_uid: str
    assoc: str  # the association (or STOW-RS request), unique across receiving processes
    calling_aet: str | None  # None for STOW-RS: a request names no AE title
    called_aet: str | None


@dataclass(frozen=True)
class Released:
    """The association ended with an A-RELEASE (or the STOW-RS request ended): its sender is
    done."""

    assoc: str


@dataclass(frozen=True)
class Closed:
    """The association was aborted or its connection closed (after a release too)."""

    assoc: str


@dataclass(frozen=True)
class MppsCompleted:
    """The modality's MPPS says the procedure is done, listing the instances it made."""

    study_uid: str | None
    sop_uids: frozenset[str]


@dataclass(frozen=True)
class Ready:
    """A further receiving process is listening."""

    pid: int


Event = Stored | Released | Closed | MppsCompleted | Ready


class EventSink(Protocol):
    def put(self, event: Event) -> None: ...
