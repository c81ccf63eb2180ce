"""Event-driven naps for pynetdicom's polling threads.

pynetdicom polls: an association's reactor thread naps 1 ms between checks for a new DIMSE
message, and its DUL thread naps 1 ms whenever the socket had nothing to read and nothing was
queued to send. Each instance waits through several such naps, which caps one association near
300 instances/s on loopback whatever the handler costs (measured: a no-op handler 315/s; with
0.1 ms naps 784/s), and shorter blind naps burn CPU that concurrent associations need.

Neither nap is configurable through pynetdicom's API, so this module gives the two pynetdicom
modules a ``time`` whose ``sleep`` turns exactly those 1 ms naps into waits that end early:

- the reactor waits on its DIMSE message queue's condition, so it wakes when a message is
  complete instead of up to 1 ms later;
- the DUL waits in ``select`` on its socket, so it wakes when data arrives; while its
  association is busy (traffic in the last 50 ms) the wait is capped at 0.2 ms, because a
  response queued by the reactor is only picked up when the DUL wakes.

Idle associations wait as long as before and cost no more CPU. Every other call goes to
``time``; nothing else in pynetdicom changes.
"""

from __future__ import annotations

import select
import threading
import time
import types
import weakref
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul

PYNETDICOM_NAP_S = 0.001
BUSY_NAP_S = 0.0002
BUSY_WINDOW_S = 0.05

_busy_until: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def mark_busy(assoc: Any) -> None:
    """Called on each message of ``assoc``: answer fast for the next BUSY_WINDOW_S."""
    _busy_until[assoc] = time.monotonic() + BUSY_WINDOW_S


def _reactor_wait(assoc: Any, seconds: float) -> None:
    q = assoc.dimse.msg_queue
    with q.not_empty:  # Queue.put notifies this condition
        if not q.queue:
            q.not_empty.wait(seconds)


def _dul_wait(dul: Any, seconds: float) -> None:
    if _busy_until.get(dul.assoc, 0.0) > time.monotonic():
        seconds = BUSY_NAP_S
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        time.sleep(seconds)
        return
    try:
        select.select([sock], [], [], seconds)
    except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check will see it
        time.sleep(seconds)


def _sleep(seconds: float) -> None:
    if seconds == PYNETDICOM_NAP_S:
        thread = threading.current_thread()
        if isinstance(thread, _association.Association):
            _reactor_wait(thread, seconds)
            return
        if isinstance(thread, _dul.DULServiceProvider):
            _dul_wait(thread, seconds)
            return
    time.sleep(seconds)


class _Time(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install() -> None:
    """Idempotent; affects only pynetdicom's association and DUL modules."""
    if isinstance(getattr(_association, "time", None), _Time):
        return
    shim = _Time("time")
    shim.sleep = _sleep  # type: ignore[attr-defined]
    _association.time = shim  # type: ignore[attr-defined]
    _dul.time = shim  # type: ignore[attr-defined]
