"""Event-driven waits for pynetdicom's polling threads.

pynetdicom polls: an association's reactor thread naps 1 ms between checks for a new DIMSE
message, and its DUL thread naps 1 ms whenever the socket had nothing to read and nothing was
queued to send. Each instance waits through several such naps, which caps one association near
300 instances/s on loopback whatever the handler costs (measured: a no-op handler 315/s; with
0.1 ms naps 784/s), and shorter blind naps burn CPU that concurrent associations need.

Neither nap is configurable through pynetdicom's API, so this module gives the two pynetdicom
modules a ``time`` whose ``sleep`` turns exactly those 1 ms naps into waits that end as soon as
there is something to do:

- the reactor waits on its DIMSE message queue's condition, so it wakes when a message is
  complete;
- the DUL waits in ``select`` on its socket, so it wakes when data arrives, and, for the
  associations we accept (:func:`attach`), on a pipe written whenever a PDU is queued for it to
  send, so a C-STORE response leaves at once.

The DUL used to nap 0.2 ms while its association was busy, to pick responses up soon enough;
with four busy associations those wakes cost some 0.4 ms of CPU per instance (A/B, 4.04
against 3.62 ms).

Once an association is established, both threads of the associations we accept wait up to
:data:`ESTABLISHED_WAIT_S` instead of 1 ms, because every event they act on then wakes them.
The DUL (in state Sta6, where only its socket or a primitive to send changes anything) wakes
on its socket and its send pipe. The reactor wakes on its message queue's condition, which
pynetdicom notifies for each DIMSE message and on an abort, and which the DUL's queue of
primitives for the reactor (release and abort requests) notifies too. Waking every
millisecond instead cost each thread a pass through its loop per millisecond while the handler
wrote to disk. The cap is a safety net for a wake-up this module does not know of, and bounds
the idle timer's lateness.
Every other call goes to ``time``; nothing else in pynetdicom changes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
import types
import weakref
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul

PYNETDICOM_NAP_S = 0.001
# Measured side by side (pipeline.bench.receive, 4 associations of 500 instances of 512x512):
# 240 -> 292 instances/s against 1 ms naps; per instance with 1 association, the DUL's waits
# 4.5 -> 2.9 and the reactor's 2.0-2.9 -> 1.0.
ESTABLISHED_WAIT_S = 0.05


class _WakingQueue(queue.Queue[Any]):
    """A DUL's queue of primitives to send; each ``put`` also wakes the DUL's ``select``."""

    def __init__(self) -> None:
        super().__init__()
        self.wake_fd, self._write_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._write_fd, False)
        # The lock keeps a late put from writing to a descriptor number that close() has
        # given back and the process has since reused for a file.
        self._fds_lock = threading.Lock()
        self._close_fds = weakref.finalize(self, _close, self.wake_fd, self._write_fd)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self._fds_lock:
            if self._close_fds.alive:
                with contextlib.suppress(BlockingIOError):  # full: a wake is pending anyway
                    os.write(self._write_fd, b"\0")

    def clear_wakes(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_fd, 4096):
                pass

    def close(self) -> None:
        with self._fds_lock:
            self._close_fds()


class _ReactorQueue(queue.Queue[Any]):
    """A DUL's queue of primitives for the association's reactor (release and abort requests,
    among others); each ``put`` also wakes the reactor's wait on its DIMSE message queue."""

    def __init__(self, messages: queue.Queue[Any]) -> None:
        super().__init__()
        self.messages = messages
        self.woken = False  # guarded by messages.not_empty's lock

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self.messages.not_empty:
            self.woken = True
            self.messages.not_empty.notify_all()


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def attach(assoc: Any) -> None:
    """Let ``assoc``'s DUL wake for PDUs to send; call before the association starts.

    The pipe is closed as soon as the association's threads have ended: left to the garbage
    collector, it stayed open until a full collection, two descriptors per association."""
    sends = _WakingQueue()
    dul = assoc.dul
    dul.to_provider_queue = sends
    dul.to_user_queue = _ReactorQueue(assoc.dimse.msg_queue)
    run = assoc.run

    def run_then_close() -> None:
        try:
            run()
        finally:
            if assoc.dul.ident is not None:  # started; pynetdicom stops it before it ends
                assoc.dul.join(timeout=10)
            if not assoc.dul.is_alive():
                sends.close()

    assoc.run = run_then_close


def _reactor_wait(assoc: Any, seconds: float) -> None:
    q = assoc.dimse.msg_queue
    for_reactor = assoc.dul.to_user_queue
    if not isinstance(for_reactor, _ReactorQueue):
        for_reactor = None
    elif assoc.is_established:
        seconds = ESTABLISHED_WAIT_S
    with q.not_empty:  # Queue.put notifies this condition
        # A flag, not the queue's length: a primitive the reactor leaves queued must not make
        # it spin.
        if not q.queue and not (for_reactor is not None and for_reactor.woken):
            q.not_empty.wait(seconds)
        if for_reactor is not None:
            for_reactor.woken = False


def _dul_wait(dul: Any, seconds: float) -> None:
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        time.sleep(seconds)
        return
    waiting = [sock]
    sends = dul.to_provider_queue
    if isinstance(sends, _WakingQueue):
        if sends.qsize():
            return
        waiting.append(sends.wake_fd)
        if dul.state_machine.current_state == "Sta6":  # established: nothing happens unwoken
            seconds = ESTABLISHED_WAIT_S
    try:
        ready, _, _ = select.select(waiting, [], [], seconds)
    except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check will see it
        time.sleep(seconds)
        return
    if isinstance(sends, _WakingQueue) and sends.wake_fd in ready:
        sends.clear_wakes()


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
