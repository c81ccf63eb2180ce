"""What every command shares: the settings built once (an invalid one said in one line, exit 2),
errors of our own as one clear message, Ctrl-C and SIGTERM as a stop, zips named on the command
line unpacked for its duration."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from pipeline.core import observe
from pipeline.core.errors import PipelineError
from pipeline.core.settings import Settings, load_settings


def load() -> Settings:
    try:
        settings = load_settings()
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    observe.configure_logging(settings)
    # pydicom's warnings about invalid values quote the value (a malformed birth date, a name
    # too long): patient data, kept out of the logs. The pipeline reports what it rejects
    # itself, values withheld (pipeline/outputs/validation.py).
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    return settings


@contextlib.contextmanager
def collected(
    paths: list[Path], settings: Settings | None = None
) -> Iterator[tuple[list[Path], list[Path]]]:
    """The files named and under folders named, zips unpacked for the duration (as the inbox
    unpacks them), a medium's other files apart; a zip the inbox would refuse ends the command
    with the reason. ``settings``: whose ``inbox.max_unpacked_mb``, else the default's."""
    from pipeline.core.sections import InboxSettings
    from pipeline.ingest.unpack import ArchiveError, collect_unpacked

    limit = (settings.inbox if settings else InboxSettings()).max_unpacked_mb * 2**20
    try:
        with collect_unpacked(paths, limit) as found:
            yield found
    except ArchiveError as exc:
        raise fail(str(exc)) from None


def retried(outcomes: list[tuple[str, bool]]) -> typer.Exit:
    """Print what each retry did (failures on stderr); exit 1 if one failed."""
    for what, ok in outcomes:
        typer.echo(what, err=not ok)
    if not outcomes:
        typer.echo("nothing to retry")
    return typer.Exit(0 if all(ok for _, ok in outcomes) else 1)


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


class StopOnSignal:
    """SIGINT/SIGTERM set an event instead of raising, so shutdown runs in order."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())


def triton_url(settings: Settings) -> str | None:
    from pipeline.runtime import embedded_triton

    if settings.triton.url:
        return settings.triton.url
    found = embedded_triton.read_endpoints(settings)
    return found.url if found else None


def wait_until_stopped(procs: list[Any]) -> None:
    stop = StopOnSignal()
    try:
        while not stop.event.wait(1.0):
            if not all(p.alive() for p in procs):
                raise fail(f"{', '.join(p.name for p in procs if not p.alive())} exited")
    finally:
        for proc in procs:
            proc.stop()


def check_weights(settings: Settings) -> None:
    """The command ends with the reason when a model of the repository has no weights."""
    from pipeline.runtime.embedded_triton import check_weights as check

    try:
        check(settings)
    except PipelineError as exc:
        raise fail(str(exc)) from None
