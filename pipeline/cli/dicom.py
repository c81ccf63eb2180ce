"""`send` and `echo`: C-STORE (or STOW-RS) and C-ECHO to any DICOM node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli.common import collected, fail

if TYPE_CHECKING:  # imported where used: `echo` starts without pydicom's data dictionaries
    from pipeline.outputs.send import stow
    from pipeline.outputs.send.scu import Peer, SendReport

HostOpt = Annotated[str, typer.Option(help="Receiver host name or address.")]
PortOpt = Annotated[int, typer.Option(help="Receiver port.")]
CalledOpt = Annotated[str, typer.Option("--called-aet", help="The receiver's AE title.")]
CallingOpt = Annotated[str, typer.Option("--calling-aet", help="Our AE title.")]
TlsOpt = Annotated[bool, typer.Option("--tls", help="Use TLS (system CA store).")]
TlsCaOpt = Annotated[
    Path | None, typer.Option("--tls-ca", help="Use TLS, trusting this CA bundle.")
]
TlsCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="Our certificate, for receivers that ask.")
]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="The key of --tls-cert.")]
PathsArg = Annotated[list[Path], typer.Argument(help="DICOM files and folders (recursive).")]
RetriesOpt = Annotated[int, typer.Option(help="Retries of what failed transiently.")]
UrlOpt = Annotated[
    str | None, typer.Option(help="A DICOMweb service's base URL: send by STOW-RS instead.")
]
TokenOpt = Annotated[Path | None, typer.Option(help="STOW-RS: a file holding the bearer token.")]


def send(
    paths: PathsArg,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 11112,
    called_aet: CalledOpt = "PIPELINE",
    calling_aet: CallingOpt = "PIPELINE_SCU",
    retries: RetriesOpt = 3,
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    url: UrlOpt = None,
    token_file: TokenOpt = None,
) -> None:
    """C-STORE files to our receiver or any PACS (or STOW-RS them to a DICOMweb service, with
    --url); exit code 1 if any file was not stored."""
    from pipeline.outputs.send import scu, stow

    _quiet_pynetdicom()
    with collected(paths) as (files, extras):
        _say_not_sent(extras)
        if not files:
            raise fail("no files to send")
        started = time.perf_counter()
        if url is not None:
            target = _stow_target(url, token_file, (tls_ca, tls_cert, tls_key))
            with _progress(f"sending to {url}", len(files)) as advance:
                report = stow.send_retrying(files, target, retries, advance)
        else:
            peer = _peer(host, port, called_aet, calling_aet, tls, tls_ca, tls_cert, tls_key)
            with _progress(f"sending to {called_aet}@{host}:{port}", len(files)) as advance:
                report = scu.send(files, peer, retries, on_done=lambda _p, _ok: advance(1))
        _say_sent(report, time.perf_counter() - started)
        raise typer.Exit(0 if report.ok else 1)


def echo(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 11112,
    called_aet: CalledOpt = "PIPELINE",
    calling_aet: CallingOpt = "PIPELINE_SCU",
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """C-ECHO a DICOM peer: exit code 0 when it answers success."""
    from pipeline.outputs.send.scu import echo as c_echo

    _quiet_pynetdicom()
    try:
        status = c_echo(_peer(host, port, called_aet, calling_aet, tls, tls_ca, tls_cert, tls_key))
    except ConnectionError as exc:
        raise fail(str(exc)) from None
    ok = status == 0
    typer.echo(f"C-ECHO {called_aet}@{host}:{port}: {'success' if ok else f'status {status}'}")
    raise typer.Exit(0 if ok else 1)


def _peer(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> Peer:
    from pipeline.core.tls import client_context
    from pipeline.outputs.send.scu import Peer

    ctx = None
    if tls or tls_ca or tls_cert:
        try:
            ctx = client_context(tls_ca, tls_cert, tls_key)
        except (OSError, ValueError) as exc:
            raise fail(f"TLS set-up: {exc}") from None
    return Peer(host, port, called_aet, calling_aet, ctx)


def _stow_target(
    url: str, token_file: Path | None, tls_files: tuple[Path | None, Path | None, Path | None]
) -> stow.StowTarget:
    from pipeline.outputs.send import stow

    try:
        return stow.StowTarget(url, 60.0, tls_files, token_file)
    except ValueError as exc:
        raise fail(str(exc)) from None


def _quiet_pynetdicom() -> None:
    """The summary says what failed and why; pynetdicom's own error lines would repeat it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


@contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over ``total`` files; the callable advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns) as progress:
        bar = progress.add_task(what, total=total)
        yield lambda n: progress.advance(bar, n)


def _say_not_sent(extras: list[Path]) -> None:
    """Not failures: a CD's whole copy is sent without an error for its viewer."""
    if extras:
        typer.echo(
            f"{len(extras)} file(s) of a DICOM medium that are not its images are not sent "
            f"(its DICOMDIR, README, viewer): {', '.join(map(str, extras[:3]))}"
            + (", …" if len(extras) > 3 else "")
        )


def _say_sent(report: SendReport, seconds: float) -> None:
    typer.echo(
        f"{len(report.sent)} sent, {len(report.failed)} failed "
        f"({len(report.sent) / max(seconds, 1e-9):.0f} instances/s)"
    )
    for path, reason in sorted(report.failed.items()):
        typer.echo(f"  failed: {path}: {reason}", err=True)
