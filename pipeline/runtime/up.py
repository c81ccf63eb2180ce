"""`up`: the whole pipeline on this machine, supervised. Redis and Triton start embedded
unless configured remote; a worker (and one for the urgent lane when configured) and the DICOM
receiver run as child processes; the inbox watcher, retention and the status page run in this
process. It says "ready" once the receiver answers C-ECHO and every worker takes jobs, restarts
a child that dies (at most 5 times a minute), and stops everything in order.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.ops import metrics
from pipeline.runtime import embedded_redis, embedded_triton
from pipeline.runtime.process import ManagedProcess
from pipeline.runtime.worker import ready_marker
from pipeline.tasks import broker

log = logging.getLogger(__name__)

Workers = list[tuple[ManagedProcess, tuple[Priority, ...]]]


def run(settings: Settings, stop: threading.Event, say: Callable[[str], None]) -> None:
    """Until ``stop`` is set. PipelineError or RuntimeError: a part could not start, or keeps
    exiting; everything started is stopped first."""
    # Imported here, in the main thread, before the watcher, retention and web threads start:
    # Celery's lazily built modules are not safe to import from two threads at once.
    from pipeline.tasks import app  # noqa: F401

    procs: list[ManagedProcess] = []
    env = dict(os.environ)
    metrics.prepare(settings, "watcher")  # the watcher runs in this process
    metrics.serve(settings, "watcher")
    try:
        _start_services(settings, env, procs, say)
        workers = _start_children(settings, env, procs)
        for proc, lanes in workers:
            _wait_for_worker(settings, proc, lanes)
        watcher = threading.Thread(
            target=run_watcher, args=(settings, stop), name="inbox-watcher", daemon=True
        )
        watcher.start()
        start_retention(settings, stop)
        say(ready_message(settings, start_web(settings, env["PIPELINE_BROKER_URL"])))
        _supervise(procs, stop)
        watcher.join(timeout=10)
    finally:
        stop.set()
        for proc in reversed(procs):
            proc.stop()
        embedded_triton.endpoints_file(settings).unlink(missing_ok=True)


def _start_services(
    settings: Settings, env: dict[str, str], procs: list[ManagedProcess], say: Callable[[str], None]
) -> None:
    """The embedded Redis and Triton unless configured remote; the children's environment
    names them."""
    if settings.broker_url is None:
        say("starting embedded Redis ...")
        procs.append(embedded_redis.start(settings))
    env["PIPELINE_BROKER_URL"] = broker.broker_url(settings)
    if not settings.triton.url:
        embedded_triton.check_weights(settings)
        say("starting embedded Triton (CPU; loading models takes a while) ...")
        proc, endpoints = embedded_triton.start(settings)
        procs.append(proc)
        env["PIPELINE_TRITON__URL"] = endpoints.url


def _start_children(
    settings: Settings, env: dict[str, str], procs: list[ManagedProcess]
) -> Workers:
    """The workers and the receiver, each a `dicom-pipeline` command of its own with its log;
    the receiver answering C-ECHO. The workers, to wait for."""

    def child(name: str, args: list[str], log_name: str) -> ManagedProcess:
        logs = settings.run_dir / "logs"
        proc = ManagedProcess(name, [sys.executable, "-m", "pipeline", *args], logs / log_name, env)
        proc.start()
        procs.append(proc)
        return proc

    workers: Workers = [(child("worker", ["worker"], "worker.log"), tuple(Priority))]
    if n := settings.worker.urgent_concurrency:
        args = ["worker", "--lane=urgent", f"--concurrency={n}"]
        workers.append((child("urgent worker", args, "urgent-worker.log"), (Priority.URGENT,)))
    if settings.receiver.enabled:
        _wait_for_receiver(settings, child("receiver", ["scp"], "receiver.log"))
    return workers


def ready_message(settings: Settings, page: str | None) -> str:
    """Where to send studies, drop files and read results."""
    rs = settings.receiver
    dicom = f"  DICOM:   AE title {rs.ae_title}, port {rs.port}\n" if rs.enabled else ""
    if rs.enabled and rs.dicomweb_port is not None:
        scheme = "https" if rs.tls_certificate else "http"
        dicom += f"  STOW-RS: {scheme}://{rs.dicomweb_host}:{rs.dicomweb_port}/studies\n"
    zips = ", .zip of them" if settings.inbox.unpack_zip else ""
    if page:
        dicom += f"  status:  {page}\n"
    return (
        "\nready. Send studies by DICOM C-STORE, or drop files "
        f"(.png .jpg .nii .nii.gz, DICOM files or folders{zips}):\n"
        f"{dicom}"
        f"  inbox:   {settings.inbox_dir.resolve()}\n"
        f"  results: {settings.results_dir.resolve()}\n"
        f"  failed:  {settings.failed_dir.resolve()}\n"
        f"  logs:    {(settings.run_dir / 'logs').resolve()}\n"
        "Ctrl-C stops everything."
    )


def run_watcher(settings: Settings, stop: threading.Event) -> None:
    """The inbox watcher, in this thread, until ``stop``."""
    from pipeline.ingest.inbox import InboxWatcher
    from pipeline.tasks.enqueue import producer

    InboxWatcher(settings, producer(settings)).run(stop)


def start_retention(settings: Settings, stop: threading.Event) -> None:
    """Pruning by the retention settings, hourly, on a thread of its own."""
    from pipeline.ops.retention import run_periodically

    threading.Thread(
        target=run_periodically, args=(settings, stop), name="retention", daemon=True
    ).start()


def start_web(settings: Settings, broker_url: str | None) -> str | None:
    """The status page in this process, or None (disabled, or its port taken: it never
    stops the pipeline)."""
    if not settings.web.enabled:
        return None
    from pipeline.ops import web

    try:
        server = web.start(settings, broker_url)
    except OSError as exc:
        log.warning(
            "status page not started on %s:%d: %s", settings.web.host, settings.web.port, exc
        )
        return None
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}/"


def _wait_for_worker(
    settings: Settings, proc: Any, lanes: tuple[Priority, ...], timeout_s: float = 300.0
) -> None:
    """Until the worker has written its process id to the run folder: it is consuming jobs."""
    marker = settings.run_dir / ready_marker(lanes)

    def taking_jobs() -> bool:
        try:
            return marker.read_text() == str(proc.pid)
        except OSError:
            return False

    proc.wait_ready(taking_jobs, timeout_s)


def _wait_for_receiver(settings: Settings, proc: Any, timeout_s: float = 60.0) -> None:
    """`ready` is printed only once the receiver answers C-ECHO (it imports pynetdicom and
    starts its receiving processes first)."""
    from pipeline.outputs.send.scu import AssociationRejectedError, Peer, echo

    rs = settings.receiver
    if rs.port == 0 or rs.tls_certificate is not None:
        return  # nothing to probe without TLS client credentials or a known port
    host = "127.0.0.1" if rs.host in {"0.0.0.0", "", "::"} else rs.host
    peer = Peer(host, rs.port, rs.ae_title, timeout_s=5)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"the DICOM receiver exited; see {proc.log_path}")
        try:
            # A plain connect first: pynetdicom logs each refused association at ERROR,
            # which put alarming lines in every start's log.
            socket.create_connection((host, rs.port), timeout=1.0).close()
            echo(peer)
            return
        except AssociationRejectedError:  # before OSError: it is a ConnectionError
            return  # listening; an allow-list refused our probe, as it should
        except OSError:  # not listening yet (ConnectionError is one too)
            time.sleep(0.2)
    raise RuntimeError(f"the DICOM receiver did not answer on port {rs.port}; see {proc.log_path}")


def _supervise(procs: list[Any], stop: threading.Event) -> None:
    """Restart a child that died on its own (at most 5 times a minute, then give up)."""
    restarts: list[float] = []
    while not stop.wait(1.0):
        for proc in procs:
            if proc.alive():
                continue
            restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
            if len(restarts) > 5:
                raise RuntimeError(f"{proc.name} keeps exiting; see {proc.log_path}")
            log.error(
                "%s exited (code %s); restarting. Log: %s",
                proc.name,
                proc.returncode(),
                proc.log_path,
            )
            proc.start()
