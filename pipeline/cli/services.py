"""The long-running components: `up`, `worker`, `scp`, `watch`, `web`, and the embedded `redis`
and `triton`."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli.common import (
    StopOnSignal,
    check_weights,
    fail,
    load,
    triton_url,
    wait_until_stopped,
)
from pipeline.core.errors import PipelineError
from pipeline.core.routing import Priority
from pipeline.ops import metrics


def redis() -> None:
    """Run the embedded Redis in the foreground (for a broker on this machine only)."""
    from pipeline.runtime import embedded_redis
    from pipeline.tasks import broker

    settings = load()
    settings.ensure_dirs()
    if settings.broker_url is not None:
        raise fail("broker_url is configured; the embedded Redis is for when it is not")
    proc = embedded_redis.start(settings)
    typer.echo(f"redis ready at {broker.broker_url(settings)}")
    wait_until_stopped([proc])


def triton() -> None:
    """Run the embedded tritonserver (CPU) in the foreground, serving the model repository."""
    from pipeline.runtime import embedded_triton

    settings = load()
    settings.ensure_dirs()
    check_weights(settings)
    proc, endpoints = embedded_triton.start(settings)
    typer.echo(f"triton ready: {endpoints.grpc} (gRPC), {endpoints.http} (HTTP)")
    try:
        wait_until_stopped([proc])
    finally:
        # A stopped server's URLs must not be picked up by a worker started later.
        embedded_triton.endpoints_file(settings).unlink(missing_ok=True)


def scp() -> None:
    """Run the DICOM receiver (C-ECHO, C-STORE, MPPS): complete studies become queued jobs."""
    from pipeline.ingest.receiver import Receiver
    from pipeline.tasks.enqueue import producer

    settings = load()
    settings.ensure_dirs()
    stop = StopOnSignal()
    metrics.prepare(settings, "receiver")
    metrics.serve(settings, "receiver")
    receiver = Receiver(settings, producer(settings))
    rs = settings.receiver
    try:
        receiver.run(
            stop.event,
            on_ready=lambda host, port: typer.echo(
                f"DICOM receiver ready: AE title {rs.ae_title} on {host}:{port}", err=True
            ),
        )
    except OSError as exc:  # e.g. the port is taken
        raise fail(f"receiver cannot listen on {rs.host}:{rs.port}: {exc}") from None
    except PipelineError as exc:  # the STOW-RS port taken
        raise fail(str(exc)) from None


def worker(
    concurrency: Annotated[int | None, typer.Option(help="Pool processes.")] = None,
    lane: Annotated[
        list[Priority] | None,
        typer.Option(
            help="Take jobs of this lane only (repeat for both; default both, urgent first): "
            "`--lane urgent` keeps a worker free for urgent studies."
        ),
    ] = None,
) -> None:
    """Run a Celery worker that processes queued jobs, urgent ones first."""
    from pipeline.core.errors import OutputError
    from pipeline.outputs.validation import dciodvfy_path
    from pipeline.runtime import worker as worker_process

    lanes = tuple(dict.fromkeys(lane or Priority))  # each once
    settings = load()
    settings.ensure_dirs()
    metrics.prepare(settings, worker_process.component(lanes))
    url = triton_url(settings)
    if not url:
        raise fail(
            "no Triton: set triton.url (PIPELINE_TRITON__URL) or run "
            "`dicom-pipeline triton` on this data dir"
        )
    if concurrency is not None:  # the pool processes share the cores by this number
        pool = settings.worker.model_copy(update={"concurrency": concurrency})
        settings = settings.model_copy(update={"worker": pool})
    try:
        tool = dciodvfy_path(settings.output.iod_check)
    except OutputError as exc:
        raise fail(f"{exc} (apt-get install dicom3tools)") from None
    if tool is None and settings.output.iod_check == "auto":
        typer.echo(
            "note: dciodvfy not installed: DICOM outputs are checked by pydicom's strict "
            "read-back instead (value representations only, not the IOD)"
        )
    worker_process.run(settings, lanes, url)


def watch() -> None:
    """Watch the inbox: stable files are spooled and queued."""
    from pipeline.runtime.up import run_watcher, start_retention

    settings = load()
    settings.ensure_dirs()
    stop = StopOnSignal()
    metrics.prepare(settings, "watcher")
    metrics.serve(settings, "watcher")
    start_retention(settings, stop.event)
    run_watcher(settings, stop.event)


def up() -> None:
    """Run everything on this machine in the foreground: Redis and Triton (unless configured
    remote), a worker, and the inbox watcher. Ctrl-C stops it all."""
    from pipeline.runtime.up import run

    settings = load()
    settings.ensure_dirs()
    stop = StopOnSignal()
    try:
        run(settings, stop.event, typer.echo)
    except (PipelineError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        typer.echo("stopped.")


def web() -> None:
    """Serve the read-only status page (also part of `up`) until Ctrl-C."""
    from pipeline.runtime.up import start_web
    from pipeline.tasks import broker

    settings = load()
    stop = StopOnSignal()
    page = start_web(
        settings.model_copy(update={"web": settings.web.model_copy(update={"enabled": True})}),
        broker.broker_url(settings),
    )
    if page is None:
        raise fail(f"cannot listen on {settings.web.host}:{settings.web.port}")
    typer.echo(f"status page: {page}")
    stop.event.wait()
