"""The ``dicom-pipeline`` command line: thin wrappers that build the settings once and call the
component functions. Errors of our own are printed as one clear message and exit code 2."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipeline.core import observe
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_write_bytes
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings, load_settings
from pipeline.ops import metrics

if TYPE_CHECKING:  # imported where used: the CLI starts without torch or MONAI
    from pipeline.convert.grouping import SeriesGroup
    from pipeline.convert.images import LoadedImage
    from pipeline.core.contract import ModelContract
    from pipeline.inference.triton_client import TritonClient
    from pipeline.outputs.send.scu import SendReport
    from pipeline.studies.models import Models

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Medical image inference pipeline: inbox/DICOM -> Celery -> Triton -> results.",
)
config_app = typer.Typer(no_args_is_help=True, help="Show or describe the configuration.")
models_app = typer.Typer(no_args_is_help=True, help="The Triton model repository.")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
failed_app = typer.Typer(no_args_is_help=True, help="Failed items: list, show, retry.")
app.add_typer(failed_app, name="failed")

log = logging.getLogger("pipeline")


def _worker_ready(lanes: tuple[Priority, ...]) -> str:
    """In the run folder: the process id of a worker taking jobs, one file per set of lanes
    (`up` may run a worker for both and one for the urgent lane only)."""
    return "worker.ready" if set(lanes) == set(Priority) else f"worker-{lanes[0]}.ready"


def _settings() -> Settings:
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
def _collected(
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
        raise _fail(str(exc)) from None


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


class _StopOnSignal:
    """SIGINT/SIGTERM set an event instead of raising, so shutdown runs in order."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())


def _triton_url(settings: Settings) -> str | None:
    from pipeline.runtime import embedded_triton

    if settings.triton.url:
        return settings.triton.url
    found = embedded_triton.read_endpoints(settings)
    return found.url if found else None


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (file + environment + defaults), secrets masked."""
    typer.echo(json.dumps(_settings().masked(), indent=2))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the configuration file."""
    typer.echo(json.dumps(Settings.model_json_schema(), indent=2))


@app.command()
def schema() -> None:
    """Print the JSON schema of the result documents (result.json and study.json)."""
    from pipeline.core.results import Result, StudyResult

    typer.echo(
        json.dumps(
            {
                "result.json": Result.model_json_schema(),
                "study.json": StudyResult.model_json_schema(),
            },
            indent=2,
        )
    )


@models_app.command("list")
def models_list() -> None:
    """The models in the repository, their inputs and labels, and whether weights are present."""
    from pipeline.core.contract import discover_contracts

    settings = _settings()
    repo = settings.triton.model_repository
    for name, c in discover_contracts(repo).items():
        weights = repo / name / "1" / c.weights
        state = "weights present" if weights.is_file() else "NO WEIGHTS (run models build-demo)"
        typer.echo(
            f"{name}: {c.spatial_dims}D {'/'.join(k.value for k in c.accepts)} -> "
            f"{', '.join(c.labels)} [{state}]"
        )


@models_app.command("build-demo")
def models_build_demo(
    force: Annotated[bool, typer.Option(help="Retrain even where weights exist.")] = False,
    model: Annotated[list[str] | None, typer.Option(help="Only this model (repeatable).")] = None,
) -> None:
    """Train demo weights on synthetic data (offline, CPU, a few minutes)."""
    import re

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from pipeline.demo.train import build_demo

    settings = _settings()
    step = re.compile(r"^(\S+): step (\d+)/(\d+)")
    with Progress(
        "{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as progress:
        bars: dict[str, Any] = {}

        def report(message: str) -> None:
            """Training steps move the model's bar; everything else is printed above it."""
            if m := step.match(message):
                name, done, total = m[1], int(m[2]), int(m[3])
                if name not in bars:
                    bars[name] = progress.add_task(f"training {name}", total=total)
                progress.update(bars[name], completed=done)
            else:
                progress.console.print(message)

        build_demo(settings.triton.model_repository, report, only=model, force=force)


@models_app.command("import-bundle")
def models_import_bundle(
    bundle: Annotated[Path, typer.Argument(help="A MONAI bundle folder (configs/, models/).")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the bundle's).")] = None,
) -> None:
    """Turn a MONAI bundle into a Triton model folder with its preprocessing derived."""
    from pipeline.inference.bundle import import_bundle

    settings = _settings()
    try:
        contract = import_bundle(bundle, settings.triton.model_repository, name)
    except PipelineError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{contract.name}: {contract.task.value}, input {list(contract.input.shape)}, labels "
        f"{', '.join(contract.labels)}, preprocessing "
        f"{', '.join(t.name for t in contract.preprocessing) or 'none'}\n"
        f"written to {settings.triton.model_repository / contract.name}; add it to a route "
        "(README: Routing) and restart Triton to serve it"
    )


@app.command()
def redis() -> None:
    """Run the embedded Redis in the foreground (for a broker on this machine only)."""
    from pipeline.runtime import embedded_redis
    from pipeline.tasks import broker

    settings = _settings()
    settings.ensure_dirs()
    if settings.broker_url is not None:
        raise _fail("broker_url is configured; the embedded Redis is for when it is not")
    proc = embedded_redis.start(settings)
    typer.echo(f"redis ready at {broker.broker_url(settings)}")
    _wait_until_stopped([proc])


@app.command()
def triton() -> None:
    """Run the embedded tritonserver (CPU) in the foreground, serving the model repository."""
    from pipeline.runtime import embedded_triton

    settings = _settings()
    settings.ensure_dirs()
    _check_weights(settings)
    proc, endpoints = embedded_triton.start(settings)
    typer.echo(f"triton ready: {endpoints.grpc} (gRPC), {endpoints.http} (HTTP)")
    try:
        _wait_until_stopped([proc])
    finally:
        # A stopped server's URLs must not be picked up by a worker started later.
        embedded_triton.endpoints_file(settings).unlink(missing_ok=True)


@app.command()
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
    from celery.signals import worker_ready

    from pipeline.core.errors import OutputError
    from pipeline.outputs.validation import dciodvfy_path
    from pipeline.tasks import broker
    from pipeline.tasks.app import QUEUE, URGENT_QUEUE, make_celery, worker_queues
    from pipeline.tasks.worker import register_tasks, wait_for_pool, warm_up_before_fork

    lanes = tuple(dict.fromkeys(lane or Priority))  # each once
    # A worker of the urgent lane alone has an endpoint of its own: it may run beside one
    # for both lanes on the same machine (`up`, worker.urgent_concurrency).
    component = "urgent_worker" if lanes == (Priority.URGENT,) else "worker"
    settings = _settings()
    settings.ensure_dirs()
    metrics.prepare(settings, component)
    url = _triton_url(settings)
    if not url:
        raise _fail(
            "no Triton: set triton.url (PIPELINE_TRITON__URL) or run "
            "`dicom-pipeline triton` on this data dir"
        )
    if concurrency is not None:  # the pool processes share the cores by this number
        pool = settings.worker.model_copy(update={"concurrency": concurrency})
        settings = settings.model_copy(update={"worker": pool})
    try:
        tool = dciodvfy_path(settings.output.iod_check)
    except OutputError as exc:
        raise _fail(f"{exc} (apt-get install dicom3tools)") from None
    if tool is None and settings.output.iod_check == "auto":
        typer.echo(
            "note: dciodvfy not installed: DICOM outputs are checked by pydicom's strict "
            "read-back instead (value representations only, not the IOD)"
        )
    broker_url = broker.broker_url(settings)
    celery = make_celery(settings, broker_url)
    warm_up_before_fork(register_tasks(celery, settings, url))

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _taking_jobs(**_: Any) -> None:
        # For `up`, which says "ready" only from here on: a study sent at once would otherwise
        # wait for the worker's start-up (2.9 s of the first study's 11 s in the end-to-end
        # benchmark), and its pool processes' (worker.prefault_mb).
        def once_pool_started() -> None:
            if not wait_for_pool(settings):
                log.warning("the worker's pool processes have not all started; ready anyway")
            atomic_write_bytes(settings.run_dir / _worker_ready(lanes), str(os.getpid()).encode())

        threading.Thread(target=once_pool_started, name="ready", daemon=True).start()

    metrics.serve(settings, component, (metrics.QueueDepth(broker_url, (URGENT_QUEUE, QUEUE)),))
    celery.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={settings.worker.concurrency}",
            "--pool=prefork",
            f"--queues={worker_queues(lanes)}",
            "--without-gossip",
            "--without-mingle",
            f"--hostname=pipeline-{os.getpid()}@%h",
        ]
    )


@app.command()
def watch() -> None:
    """Watch the inbox: stable files are spooled and queued."""
    settings = _settings()
    settings.ensure_dirs()
    stop = _StopOnSignal()
    metrics.prepare(settings, "watcher")
    metrics.serve(settings, "watcher")
    _start_retention(settings, stop.event)
    _run_watcher(settings, stop.event)


def _start_retention(settings: Settings, stop: threading.Event) -> None:
    from pipeline.ops.retention import run_periodically

    threading.Thread(
        target=run_periodically, args=(settings, stop), name="retention", daemon=True
    ).start()


def _run_watcher(settings: Settings, stop: threading.Event) -> None:
    from pipeline.ingest.inbox import InboxWatcher
    from pipeline.tasks.enqueue import producer

    watcher = InboxWatcher(settings, producer(settings))
    watcher.run(stop)


@app.command()
def scp() -> None:
    """Run the DICOM receiver (C-ECHO, C-STORE, MPPS): complete studies become queued jobs."""
    from pipeline.ingest.receiver import Receiver
    from pipeline.tasks.enqueue import producer

    settings = _settings()
    settings.ensure_dirs()
    stop = _StopOnSignal()
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
        raise _fail(f"receiver cannot listen on {rs.host}:{rs.port}: {exc}") from None
    except PipelineError as exc:  # the STOW-RS port taken
        raise _fail(str(exc)) from None


def _peer(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> Any:
    from pipeline.core.tls import client_context
    from pipeline.outputs.send.scu import Peer

    ctx = None
    if tls or tls_ca or tls_cert:
        try:
            ctx = client_context(tls_ca, tls_cert, tls_key)
        except (OSError, ValueError) as exc:
            raise _fail(f"TLS set-up: {exc}") from None
    return Peer(host, port, called_aet, calling_aet, ctx)


def _quiet_pynetdicom() -> None:
    """The summary says what failed and why; pynetdicom's own error lines would repeat it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


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


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files and folders (recursive).")],
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 11112,
    called_aet: CalledOpt = "PIPELINE",
    calling_aet: CallingOpt = "PIPELINE_SCU",
    retries: Annotated[int, typer.Option(help="Retries of what failed transiently.")] = 3,
    tls: TlsOpt = False,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    url: Annotated[
        str | None,
        typer.Option(help="A DICOMweb service's base URL: send by STOW-RS instead."),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="STOW-RS: a file holding the bearer token.")
    ] = None,
) -> None:
    """C-STORE files to our receiver or any PACS (or STOW-RS them to a DICOMweb service, with
    --url); exit code 1 if any file was not stored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from pipeline.outputs.send.scu import send as send_files

    _quiet_pynetdicom()
    with _collected(paths) as (files, extras):
        if extras:  # not failures: a CD's whole copy is sent without an error for its viewer
            typer.echo(
                f"{len(extras)} file(s) of a DICOM medium that are not its images are not sent "
                f"(its DICOMDIR, README, viewer): {', '.join(map(str, extras[:3]))}"
                + (", …" if len(extras) > 3 else "")
            )
        if not files:
            raise _fail("no files to send")
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            started = time.perf_counter()
            if url is not None:
                bar = progress.add_task(f"sending to {url}", total=len(files))
                tls_files = (tls_ca, tls_cert, tls_key)
                report = _stow_files(
                    files, url, token_file, tls_files, retries, lambda n: progress.advance(bar, n)
                )
            else:
                peer = _peer(host, port, called_aet, calling_aet, tls, tls_ca, tls_cert, tls_key)
                bar = progress.add_task(f"sending to {called_aet}@{host}:{port}", total=len(files))
                report = send_files(
                    files, peer, retries=retries, on_done=lambda _p, _ok: progress.advance(bar)
                )
            seconds = time.perf_counter() - started
        typer.echo(
            f"{len(report.sent)} sent, {len(report.failed)} failed "
            f"({len(report.sent) / max(seconds, 1e-9):.0f} instances/s)"
        )
        for path, reason in sorted(report.failed.items()):
            typer.echo(f"  failed: {path}: {reason}", err=True)
        raise typer.Exit(0 if report.ok else 1)


def _stow_files(
    files: list[Path],
    url: str,
    token_file: Path | None,
    tls_files: tuple[Path | None, Path | None, Path | None],
    retries: int,
    advance: Callable[[int], None],
) -> SendReport:
    """``send --url``: STOW-RS, a request per study; what failed for a reason that may pass is
    tried again, up to ``retries`` times, with backoff."""
    from pipeline.outputs.send import stow as stow_send
    from pipeline.outputs.send.scu import SendReport

    try:
        target = stow_send.StowTarget(url, 60.0, tls_files, token_file)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    report = SendReport()
    todo = list(files)
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0**attempt, 30.0))
        batch = stow_send.send(todo, target)
        report.sent += batch.sent
        todo = [p for p in batch.failed if p in batch.transient and attempt < retries]
        report.failed.update({p: why for p, why in batch.failed.items() if p not in todo})
        advance(len(batch.sent) + len(batch.failed) - len(todo))
        if not todo:
            break
    return report


@app.command()
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
        raise _fail(str(exc)) from None
    ok = status == 0
    typer.echo(f"C-ECHO {called_aet}@{host}:{port}: {'success' if ok else f'status {status}'}")
    raise typer.Exit(0 if ok else 1)


@app.command()
def up() -> None:
    """Run everything on this machine in the foreground: Redis and Triton (unless configured
    remote), a worker, and the inbox watcher. Ctrl-C stops it all."""
    # Imported here, in the main thread, before the watcher, retention and web threads start:
    # Celery's lazily built modules are not safe to import from two threads at once.
    from pipeline.runtime import embedded_redis, embedded_triton
    from pipeline.runtime.process import ManagedProcess
    from pipeline.tasks import app as queue  # noqa: F401
    from pipeline.tasks import broker

    settings = _settings()
    settings.ensure_dirs()
    stop = _StopOnSignal()
    procs: list[ManagedProcess] = []
    env = dict(os.environ)
    metrics.prepare(settings, "watcher")  # the watcher runs in this process
    metrics.serve(settings, "watcher")
    try:
        if settings.broker_url is None:
            typer.echo("starting embedded Redis ...")
            procs.append(embedded_redis.start(settings))
        env["PIPELINE_BROKER_URL"] = broker.broker_url(settings)
        if not settings.triton.url:
            _check_weights(settings)
            typer.echo("starting embedded Triton (CPU; loading models takes a while) ...")
            proc, endpoints = embedded_triton.start(settings)
            procs.append(proc)
            env["PIPELINE_TRITON__URL"] = endpoints.url
        worker_proc = ManagedProcess(
            "worker",
            [sys.executable, "-m", "pipeline", "worker"],
            settings.run_dir / "logs" / "worker.log",
            env=env,
        )
        worker_proc.start()
        procs.append(worker_proc)
        workers = [(worker_proc, tuple(Priority))]
        if n := settings.worker.urgent_concurrency:
            urgent_proc = ManagedProcess(
                "urgent worker",
                [sys.executable, "-m", "pipeline", "worker", "--lane=urgent", f"--concurrency={n}"],
                settings.run_dir / "logs" / "urgent-worker.log",
                env=env,
            )
            urgent_proc.start()
            procs.append(urgent_proc)
            workers.append((urgent_proc, (Priority.URGENT,)))
        if settings.receiver.enabled:
            receiver_proc = ManagedProcess(
                "receiver",
                [sys.executable, "-m", "pipeline", "scp"],
                settings.run_dir / "logs" / "receiver.log",
                env=env,
            )
            receiver_proc.start()
            procs.append(receiver_proc)
            _wait_for_receiver(settings, receiver_proc)
        for proc, lanes in workers:
            _wait_for_worker(settings, proc, lanes)
        watcher = threading.Thread(
            target=_run_watcher, args=(settings, stop.event), name="inbox-watcher", daemon=True
        )
        watcher.start()
        _start_retention(settings, stop.event)
        page = _start_web(settings, env["PIPELINE_BROKER_URL"])
        rs = settings.receiver
        dicom = f"  DICOM:   AE title {rs.ae_title}, port {rs.port}\n" if rs.enabled else ""
        if rs.enabled and rs.dicomweb_port is not None:
            scheme = "https" if rs.tls_certificate else "http"
            dicom += f"  STOW-RS: {scheme}://{rs.dicomweb_host}:{rs.dicomweb_port}/studies\n"
        zips = ", .zip of them" if settings.inbox.unpack_zip else ""
        if page:
            dicom += f"  status:  {page}\n"
        typer.echo(
            "\nready. Send studies by DICOM C-STORE, or drop files "
            f"(.png .jpg .nii .nii.gz, DICOM files or folders{zips}):\n"
            f"{dicom}"
            f"  inbox:   {settings.inbox_dir.resolve()}\n"
            f"  results: {settings.results_dir.resolve()}\n"
            f"  failed:  {settings.failed_dir.resolve()}\n"
            f"  logs:    {(settings.run_dir / 'logs').resolve()}\n"
            "Ctrl-C stops everything."
        )
        _supervise(procs, stop.event)
        watcher.join(timeout=10)
    except (PipelineError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        stop.event.set()
        for proc in reversed(procs):
            proc.stop()
        embedded_triton.endpoints_file(settings).unlink(missing_ok=True)
        typer.echo("stopped.")


def _start_web(settings: Settings, broker_url: str | None) -> str | None:
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
    marker = settings.run_dir / _worker_ready(lanes)

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


def _wait_until_stopped(procs: list[Any]) -> None:
    stop = _StopOnSignal()
    try:
        while not stop.event.wait(1.0):
            if not all(p.alive() for p in procs):
                raise _fail(f"{', '.join(p.name for p in procs if not p.alive())} exited")
    finally:
        for proc in procs:
            proc.stop()


def _check_weights(settings: Settings) -> None:
    from pipeline.core.contract import discover_contracts

    repo = settings.triton.model_repository
    missing = [
        name
        for name, c in discover_contracts(repo).items()
        if not (repo / name / "1" / c.weights).is_file()
    ]
    if missing:
        raise _fail(
            f"no weights for {', '.join(missing)} in {repo}: run "
            "`dicom-pipeline models build-demo` (demo weights) or put real TorchScript "
            "weights in <model>/1/ (see README)"
        )


@app.command()
def route(
    paths: Annotated[list[Path], typer.Argument(help="DICOM folders/files, NIfTI or images.")],
    explain: Annotated[
        bool, typer.Option("--explain", help="Show every rule's verdict, not just the winner.")
    ] = False,
    calling_aet: Annotated[str, typer.Option(help="As if sent by this AE title.")] = "",
    called_aet: Annotated[str, typer.Option(help="As if sent to this AE title.")] = "",
) -> None:
    """Dry run of the routing rules: which rule and models each series or file would get."""
    from pipeline.ops.explain import explain_paths

    settings = _settings()
    with _collected(paths, settings) as (files, extras):
        lines = explain_paths(settings.routes, files, extras, calling_aet, called_aet, explain)
        for line in lines:
            typer.echo(line)


@app.command()
def infer(
    files: Annotated[
        list[Path], typer.Argument(help="PNG/JPEG, NIfTI or DICOM files, or folders of them.")
    ],
) -> None:
    """One-shot: convert each file, call Triton, print the prediction (no queue involved).
    DICOM files (named, or in folders named) are gathered into series, as the pipeline does.

    Uses triton.url, or a running embedded Triton, or starts one for the duration."""
    from pipeline.convert import grouping
    from pipeline.core.contract import discover_contracts
    from pipeline.core.filekinds import why_extra
    from pipeline.core.instances import file_identity
    from pipeline.inference.triton_client import TritonClient
    from pipeline.runtime import embedded_triton
    from pipeline.studies.models import Models

    settings = _settings()
    settings.ensure_dirs()
    with _collected(files, settings) as (paths, extras):
        dicom = {p for p in paths if p.is_file() and file_identity(p) is not None}
        singles = [p for p in paths if p not in dicom]
        groups, not_images = grouping.group_series(sorted(dicom))
        proc = None
        url = _triton_url(settings)
        if url:
            with TritonClient(url, settings.triton) as probe:
                url = url if probe.is_ready() else None
        if not url:
            _check_weights(settings)
            typer.echo("starting embedded Triton for this run ...", err=True)
            proc, endpoints = embedded_triton.start(settings)
            url = endpoints.url
        models = Models(discover_contracts(settings.triton.model_repository))
        client = TritonClient(url, settings.triton)
        failures = 0
        try:
            units: list[grouping.SeriesGroup | Path] = [*groups, *singles]
            for unit in units:
                for line in _infer_unit(unit, settings, models, client):
                    failures += "error" in line
                    typer.echo(json.dumps(line))
            for skipped in not_images:
                typer.echo(json.dumps({"file": skipped.name, "skipped": skipped.reason}))
            for extra in extras:
                typer.echo(json.dumps({"file": str(extra), "skipped": why_extra(extra)}))
        finally:
            client.close()
            if proc is not None:
                proc.stop()
        raise typer.Exit(1 if failures else 0)


def _infer_unit(
    unit: SeriesGroup | Path, settings: Settings, models: Models, client: TritonClient
) -> Iterator[dict[str, object]]:
    """``infer``'s lines for one series or file: an answer per model, or why there is none."""
    from pipeline.convert import images as convert
    from pipeline.studies.inputs import inbox_facts, series_input

    where: dict[str, object] = (
        {"file": str(unit)}
        if isinstance(unit, Path)
        else {"series": unit.uid, "planes": unit.planes, "files": len(unit.paths)}
    )
    try:
        if isinstance(unit, Path):
            image = convert.load(unit)
            route, chosen = models.choose(settings.routes, inbox_facts(unit, image), image)
        else:
            route = models.route(settings.routes, unit.facts())
            image, _ = series_input(unit, models, route)
            chosen = models.for_route(route, image)
        for line in _answers(image, chosen, client):
            yield {**where, "route": route.name, **line}
    except convert.NotAnImageError as exc:
        yield {**where, "skipped": str(exc)}
    except (PipelineError, OSError) as exc:
        yield {**where, "error": f"{type(exc).__name__}: {exc}"}


def _answers(
    image: LoadedImage, chosen: list[ModelContract], client: TritonClient
) -> Iterator[dict[str, object]]:
    """Each chosen model's answer for ``image``, as ``infer`` prints it."""
    import numpy as np

    from pipeline.convert import images as convert
    from pipeline.core.contract import Task
    from pipeline.inference.decide import decide, decide_segmentation
    from pipeline.inference.segment import segment

    prep = convert.Preprocessing(image, chosen)
    for c in chosen:
        found: dict[str, object] = {}
        if c.task is Task.SEGMENTATION:  # the worker's sliding window
            seg = segment(image, c, client, prep)
            pred, ms = decide_segmentation(c, seg), seg.inference_ms
            found = {"lesions": len(seg.lesions), "total_volume_ml": seg.total_volume_ml}
        else:
            out = client.infer(c, prep.model_input(c)[0][np.newaxis])
            pred, ms = decide(c, out.probabilities[0]), out.milliseconds
        yield {
            "model": c.name,
            "label": pred.label,
            "probabilities": pred.probabilities,
            **found,
            "inference_ms": round(ms, 1),
        }


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option(help="Small sizes: a smoke run, not figures to quote.")
    ] = False,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write every figure.")] = Path(
        "bench.json"
    ),
) -> None:
    """Run the benchmarks (receive, convert, infer, end to end) one after another; print the
    ratios the goals are about and write every figure as JSON."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pipeline.bench.all import FULL, run_all, summary

    settings = _settings()
    with Progress(
        "{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        bar = progress.add_task("bench", total=len(FULL))
        done: list[str] = []

        def step(name: str) -> None:
            progress.update(bar, description=f"bench: {name}", completed=len(done))
            done.append(name)

        figures = run_all(quick, settings.triton.model_repository, step)
        progress.update(bar, completed=len(FULL))
    json_out.write_text(json.dumps(figures, indent=2) + "\n")
    for what, figure, goal in summary(figures):
        typer.echo(f"{what:<42}{figure:<44}{goal}")
    typer.echo(f"every figure: {json_out}")
    raise typer.Exit(1 if any("error" in part for part in figures.values()) else 0)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
) -> None:
    """Queues, studies in flight, recent results with their timings, and failures."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.ops import status as status_mod
    from pipeline.tasks import broker

    settings = _settings()
    snap = status_mod.snapshot(settings, broker.broker_url(settings))
    if as_json:
        typer.echo(json.dumps(snap.as_json(), indent=2))
        return
    console = Console()
    queues = ", ".join(f"{k} {v}" for k, v in snap.queues.items()) or "-"
    console.print(f"Redis: {snap.broker}; queues: {queues}")

    def table(title: str, *columns: str) -> Table:
        """UIDs and errors wrap rather than being cut: a truncated UID names nothing."""
        t = Table(title=title)
        for column in columns:
            t.add_column(column, overflow="fold")
        return t

    flight = table("In flight", "study / input", "state", "for", "detail")
    for f in snap.in_flight:
        flight.add_row(f.what, f.state, f"{f.age_s:.0f} s", f.detail)
    console.print(flight if snap.in_flight else "nothing in flight")
    recent = table(
        "Recent results", "finished", "study / input", "model", "label", "p", "total", "Triton"
    )
    for r in snap.results:
        recent.add_row(
            r.finished.astimezone().strftime("%m-%d %H:%M:%S"),
            r.what,
            r.model,
            r.label + ("" if r.lesions is None else f" ({r.lesions} lesions)"),
            f"{r.probability:.3f}",
            f"{r.total_s:.1f} s" + (" (urgent)" if r.urgent else ""),
            f"{r.inference_ms:.0f} ms",
        )
    console.print(recent if snap.results else "no results yet")
    failures = table("Failed", "when", "id", "stage", "error")
    for item in snap.failed:
        failures.add_row(item.when, item.id, item.stage, item.error[:200])
    console.print(failures if snap.failed else "no failed items")


@app.command()
def web() -> None:
    """Serve the read-only status page (also part of `up`) until Ctrl-C."""
    from pipeline.tasks import broker

    settings = _settings()
    stop = _StopOnSignal()
    page = _start_web(
        settings.model_copy(update={"web": settings.web.model_copy(update={"enabled": True})}),
        broker.broker_url(settings),
    )
    if page is None:
        raise _fail(f"cannot listen on {settings.web.host}:{settings.web.port}")
    typer.echo(f"status page: {page}")
    stop.event.wait()


@app.command()
def prune(
    dry_run: Annotated[bool, typer.Option(help="Only list what would be removed.")] = False,
) -> None:
    """Apply the retention settings now (`up` and `watch` do it hourly)."""
    from pipeline.ops.retention import prune as run_prune

    settings = _settings()
    removed = run_prune(settings, dry_run=dry_run)
    for item in removed:
        typer.echo(
            f"{'would remove' if dry_run else 'removed'} {item.area}: {item.path.name} "
            f"({item.age_days:.1f} days)"
        )
    typer.echo(f"{len(removed)} item(s) {'to remove' if dry_run else 'removed'}")


@failed_app.command("list")
def failed_list() -> None:
    """Every item in data/failed/, oldest first: id, time, stage, error, item."""
    from pipeline.ops import failed

    found = failed.items(_settings())
    if not found:
        typer.echo("no failed items")
        return
    for item in found:
        error = item.error
        message = str(error.get("message", "")).replace("\n", " ")
        typer.echo(
            f"{item.id}  {item.when}  {item.kind}/{error.get('stage', '?')}  "
            f"{error.get('type', '?')}: {message[:100]}  [{item.what}]"
        )
    typer.echo(f"{len(found)} failed item(s); `dicom-pipeline failed show ID` for one")


@failed_app.command("show")
def failed_show(item_id: Annotated[str, typer.Argument(help="An id from `failed list`.")]) -> None:
    """One failed item: its error and the files kept with it."""
    from pipeline.ops import failed

    settings = _settings()
    try:
        item = failed.find(settings, item_id)
    except PipelineError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(item.error, indent=2))
    typer.echo("files:")
    for path in sorted(item.folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            typer.echo(f"  {path.relative_to(item.folder)}")


@failed_app.command("retry")
def failed_retry(
    item_ids: Annotated[list[str] | None, typer.Argument(help="Ids from `failed list`.")] = None,
    all_items: Annotated[bool, typer.Option("--all", help="Every retryable item.")] = False,
) -> None:
    """Retry failed items after a fix: jobs go back to the spool and are queued, unsent
    results are queued for sending again."""
    from pipeline.ops import failed
    from pipeline.outputs.send.dispatch import Delivery
    from pipeline.tasks import broker
    from pipeline.tasks.app import make_celery
    from pipeline.tasks.enqueue import producer, queue_delivery

    if not item_ids and not all_items:
        raise _fail("name the items to retry, or --all")
    settings = _settings()
    celery = make_celery(settings, broker.broker_url(settings))

    def send_again(delivery: Delivery) -> None:
        queue_delivery(celery, delivery)

    queue = producer(settings, celery).enqueue

    outcomes: list[tuple[str, bool]] = []
    if all_items:
        outcomes = [(what, ok) for _, what, ok in failed.retry_all(settings, queue, send_again)]
    for item_id in item_ids or []:
        try:
            item = failed.find(settings, item_id)
            outcomes.append((failed.retry(settings, item, queue, send_again), True))
        except PipelineError as exc:
            outcomes.append((str(exc), False))
    for what, ok in outcomes:
        typer.echo(what, err=not ok)
    if not outcomes:
        typer.echo("nothing to retry")
    raise typer.Exit(0 if all(ok for _, ok in outcomes) else 1)


def main() -> None:
    app()
