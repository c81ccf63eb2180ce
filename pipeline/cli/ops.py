"""`status`, `failed`, `prune` and `bench`: what operators use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli.common import fail, load, retried
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from rich.table import Table

    from pipeline.ops.status import Snapshot


failed_app = typer.Typer(no_args_is_help=True, help="Failed items: list, show, retry.")


def bench(
    quick: Annotated[
        bool, typer.Option(help="Small sizes: a smoke run, not figures to quote.")
    ] = False,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write every figure.")] = Path(
        "bench.json"
    ),
) -> None:
    """Run the benchmarks (receive, convert, infer, end to end, big study) one after another;
    print the ratios the goals are about and write every figure as JSON."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pipeline.bench.all import FULL, run_all, summary

    settings = load()
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


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
) -> None:
    """Queues, studies in flight, recent results with their timings, and failures."""
    from pipeline.ops import status as status_mod
    from pipeline.tasks import broker

    settings = load()
    snap = status_mod.snapshot(settings, broker.broker_url(settings))
    if as_json:
        typer.echo(json.dumps(snap.as_json(), indent=2))
    else:
        _print_snapshot(snap)


def _print_snapshot(snap: Snapshot) -> None:
    from rich.console import Console

    console = Console()
    queues = ", ".join(f"{k} {v}" for k, v in snap.queues.items()) or "-"
    console.print(f"Redis: {snap.broker}; queues: {queues}")
    flight = _table("In flight", "study / input", "state", "for", "detail")
    for f in snap.in_flight:
        flight.add_row(f.what, f.state, f"{f.age_s:.0f} s", f.detail)
    console.print(flight if snap.in_flight else "nothing in flight")
    recent = _table(
        "Recent results", "finished", "study / input", "model", "label", "p", "total", "Triton"
    )
    for r in snap.results:
        recent.add_row(
            r.finished.astimezone().strftime("%m-%d %H:%M:%S"),
            r.what,
            r.model,
            r.label + (f" ({r.findings})" if r.findings else ""),
            f"{r.probability:.3f}",
            f"{r.total_s:.1f} s" + (" (urgent)" if r.urgent else ""),
            f"{r.inference_ms:.0f} ms",
        )
    console.print(recent if snap.results else "no results yet")
    failures = _table("Failed", "when", "id", "stage", "error")
    for item in snap.failed:
        failures.add_row(item.when, item.id, item.stage, item.error[:200])
    console.print(failures if snap.failed else "no failed items")
    console.print(snap.unrouted.line, highlight=False)
    if snap.memory:
        console.print(snap.memory.line, highlight=False)
    for line in snap.pulls:
        console.print(line, highlight=False)


def _table(title: str, *columns: str) -> Table:
    """UIDs and errors wrap rather than being cut: a truncated UID names nothing."""
    from rich.table import Table

    t = Table(title=title)
    for column in columns:
        t.add_column(column, overflow="fold")
    return t


def prune(
    dry_run: Annotated[bool, typer.Option(help="Only list what would be removed.")] = False,
) -> None:
    """Apply the retention settings now (`up` and `watch` do it hourly)."""
    from pipeline.ops.retention import prune as run_prune

    settings = load()
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

    found = failed.items(load())
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

    settings = load()
    try:
        item = failed.find(settings, item_id)
    except PipelineError as exc:
        raise fail(str(exc)) from None
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
        raise fail("name the items to retry, or --all")
    settings = load()
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
    raise retried(outcomes)
