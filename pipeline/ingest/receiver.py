"""The receiver service: serves associations and turns complete studies into queued jobs.

At start-up it repairs what a crash left (half-made job folders, partial writes), adopts study
folders still in the spool (their sender may resume; they complete on the usual rules) and
queues jobs that were never queued. Then one loop reads the handlers' events, asks the
:class:`~pipeline.ingest.completion.StudyTracker` which studies are complete, closes each into
a job and queues it. With Redis down, jobs wait in the spool and are offered again every few
seconds.

Each further receiving process sends its events through a pipe of its own, read by a thread
of the parent. Nothing is shared between the processes but the port: a process killed at any
moment (the OOM killer's SIGKILL) takes only its own pipe with it. A shared
``multiprocessing.Queue`` serialises its writers with a lock that a process killed in the
middle of a write leaves held; every other process's events then stopped, and the studies
they received completed only when adopted from the spool after the quiet period.

DICOMweb STOW-RS, when configured, is served by this process too (:mod:`.stow`): its requests
put their events straight into :attr:`Receiver.events`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pipeline.core import observe
from pipeline.core.errors import PipelineError
from pipeline.core.instances import INBOX_FILES, clean_incoming
from pipeline.core.jobs import recover_staging
from pipeline.core.settings import Settings
from pipeline.ingest import stow
from pipeline.ingest.completion import StudyTracker, spooled_studies
from pipeline.ingest.events import Closed, Event, MppsCompleted, Ready, Released, Stored
from pipeline.ingest.handover import Producer
from pipeline.ingest.scp import start_server

log = logging.getLogger(__name__)

REQUEUE_S = 5.0


class _PipeSink:
    """A receiving process's end of its event pipe; its handler threads take turns."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def put(self, event: Event) -> None:
        # OSError: the parent is gone, and this process follows it within a second; what it
        # stored meanwhile is in the spool, adopted when the receiver starts again.
        with self._lock, contextlib.suppress(OSError):
            self._conn.send(event)


def _serve_child(settings: Settings, port: int, conn: Connection, stop: Any) -> None:
    """A further receiving process: same port (SO_REUSEPORT), events to the parent.

    It stops when the parent closes its end of the ``stop`` pipe, or dies. Ctrl-C and a
    SIGTERM to the whole process group (`up`, systemd) are the parent's to act on: it stops
    its children after its own server, and a child dead of the signal first would look like
    a crash to be restarted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    observe.configure_logging(settings)
    parent = os.getppid()
    events = _PipeSink(conn)
    server = start_server(settings, events, port=port)
    events.put(Ready(os.getpid()))
    try:
        # Exit with the parent: a receiver nobody reads events from must not take instances.
        # The parent never writes: readable means its end is closed.
        while not stop.poll(1.0) and os.getppid() == parent:
            pass
    finally:
        server.shutdown()
        server.server_close()


class Receiver:
    def __init__(self, settings: Settings, producer: Producer) -> None:
        rs = settings.receiver
        self.settings = settings
        self.spool = settings.spool_dir
        self.producer = producer
        self._mp = multiprocessing.get_context("spawn")
        # The children's stop signal: they see end-of-file once this end is closed.
        self._stop_read, self._stop_write = self._mp.Pipe(duplex=False)
        # Every process's events, the parent's own handlers' and (through a reader thread
        # each) the further processes'.
        self.events: queue.Queue[Event] = queue.Queue()
        self.children: list[Any] = []
        self.tracker = StudyTracker(
            rs.release_grace_s, rs.quiet_period_s, rs.max_wait_s, early_start=rs.early_start
        )
        self.address: tuple[str, int] | None = None

    def recover(self) -> None:
        self.settings.ensure_dirs()
        recover_staging(self.spool, self.settings.inbox_dir)
        if removed := clean_incoming(self.spool):
            log.warning("removed %d partial instance write(s) left by a crash", removed)
        self._adopt()
        self.producer.requeue_pending()

    def _adopt(self) -> None:
        for study_uid, sops in spooled_studies(self.spool):
            if (self.spool / study_uid / INBOX_FILES).exists():
                # Gathered from the inbox: the watcher completes it, seeing the files still
                # being copied in; adopted here, it would be cut after the quiet period.
                continue
            if study_uid not in self.tracker:
                self.tracker.adopt(study_uid, sops)
                log.info("study %s: %d instance(s) in the spool, resumed", study_uid, len(sops))

    def run(
        self, stop: threading.Event, on_ready: Callable[[str, int], None] | None = None
    ) -> None:
        """Serve until ``stop`` is set."""
        self.recover()
        server = start_server(self.settings, self.events)
        host, port = server.server_address[:2]
        self.address = (str(host), int(port))
        log.info(
            "DICOM receiver %s listening on %s:%d%s",
            self.settings.receiver.ae_title,
            host,
            port,
            " (TLS)" if server.ssl_context else "",
        )
        web = None
        rs = self.settings.receiver
        if rs.dicomweb_port is not None:
            try:
                web = stow.start(self.settings, self.events)  # in this process: no pipe needed
            except OSError as exc:  # the port taken, say: the error names it, not the DICOM one
                server.shutdown()
                server.server_close()
                raise PipelineError(
                    f"STOW-RS cannot listen on {rs.dicomweb_host}:{rs.dicomweb_port}: {exc}"
                ) from None
            log.info("DICOMweb STOW-RS listening on %s", web.url)
        for i in range(1, self.settings.receiver.processes):
            self.children.append(self._start_child(i, int(port)))
        self._wait_children_ready(stop)
        if on_ready is not None:
            on_ready(str(host), int(port))
        last_requeue = last_adopt = time.monotonic()
        try:
            while not stop.is_set():
                self._drain(timeout=0.1)
                self._close_due()
                if not stop.is_set():  # stopping: a child that exits now is not replaced
                    self._restart_dead_children(int(port))
                t = time.monotonic()
                if t - last_requeue >= REQUEUE_S:
                    self.producer.requeue_pending()
                    last_requeue = t
                if t - last_adopt >= self.settings.receiver.quiet_period_s:
                    self._adopt()  # a safety net for events lost with a crashed process
                    last_adopt = t
        finally:
            self._stop_write.close()
            server.shutdown()
            server.server_close()
            if web is not None:
                web.shutdown()
                web.server_close()
            for child in self.children:
                child.join(timeout=10)
                if child.is_alive():
                    child.kill()
            self._stop_read.close()
            log.info("DICOM receiver stopped")

    def _wait_children_ready(self, stop: threading.Event, timeout_s: float = 60.0) -> None:
        waiting = len(self.children)
        deadline = time.monotonic() + timeout_s
        # A stop during start-up may have killed them before they could ignore it.
        while waiting and time.monotonic() < deadline and not stop.is_set():
            try:
                item = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, Ready):
                waiting -= 1
            else:
                self._apply(item)
        if waiting and not stop.is_set():
            log.error("%d receiving process(es) did not start in %.0f s", waiting, timeout_s)

    def _start_child(self, index: int, port: int) -> Any:
        receive, send = self._mp.Pipe(duplex=False)
        child = self._mp.Process(
            target=_serve_child,
            args=(self.settings, port, send, self._stop_read),
            name=f"receiver-{index}",
            daemon=True,
        )
        child.start()
        send.close()  # the child's end only: its exit is then this end's end of file
        threading.Thread(
            target=self._relay, args=(receive,), name=f"receiver-{index}-events", daemon=True
        ).start()
        return child

    def _relay(self, conn: Connection) -> None:
        """A receiving process's events into :attr:`events`, until the process is gone."""
        with conn:
            while True:
                try:
                    self.events.put(conn.recv())
                except (EOFError, OSError):
                    return

    def _restart_dead_children(self, port: int) -> None:
        for i, child in enumerate(self.children):
            if not child.is_alive():
                log.error("%s exited (code %s); restarting it", child.name, child.exitcode)
                self.children[i] = self._start_child(i + 1, port)

    def _drain(self, timeout: float) -> None:
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._apply(item)
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return

    def _apply(self, event: Event) -> None:
        match event:
            case Stored(study, sop, assoc, calling, called):
                self.tracker.stored(study, sop, assoc, calling, called)
            case Released(assoc):
                self.tracker.released(assoc)
            case Closed(assoc):
                self.tracker.aborted(assoc)
            case MppsCompleted(study, sops):
                self.tracker.mpps_completed(study, sops)
            case Ready():
                pass  # a receiving process restarted after a crash

    def _close_due(self) -> None:
        for done in self.tracker.due():
            try:
                self.producer.close(done)
            except OSError as exc:
                # Left in the spool: adopted again and retried after the quiet period.
                log.error("study %s: could not close: %s", done.study_uid, exc)
