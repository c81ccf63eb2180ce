"""`unrouted`: inputs no routing rule took, as the ``unrouted`` setting set them aside."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

import typer

from pipeline.cli.common import fail, load, retried
from pipeline.core.errors import PipelineError

app = typer.Typer(
    no_args_is_help=True, help="Inputs no routing rule took: the day's record, kept ones retried."
)


@app.command("list")
def unrouted_list(
    day: Annotated[
        str | None, typer.Option(help="A UTC day, YYYY-MM-DD; today if not given.")
    ] = None,
) -> None:
    """The day's inputs no rule took: time, job, study or file, policy, modalities, why; then
    the inputs kept for a later rule."""
    from pipeline.core import unrouted

    settings = load()
    try:
        when = date.fromisoformat(day) if day else datetime.now(UTC).date()
    except ValueError:
        raise fail(f"not a day: {day!r} (YYYY-MM-DD)") from None
    found = unrouted.entries(settings.unrouted_dir, when)
    for e in found:
        first = e.items[0].reason if e.items else ""
        typer.echo(
            f"{e.time:%H:%M:%S}  {e.job}  {e.study or e.name}  {e.policy}  "
            f"{','.join(e.modalities)}  {len(e.items)} series/file(s): {first[:120]}"
        )
    typer.echo(f"{len(found)} input(s) no rule took on {when}")
    folders = unrouted.kept(settings.unrouted_dir)
    if folders:
        typer.echo(f"kept for a later rule: {' '.join(f.name for f in folders)}")
        typer.echo("`dicom-pipeline unrouted retry --all` routes them again")


@app.command("retry")
def unrouted_retry(
    item_ids: Annotated[list[str] | None, typer.Argument(help="Kept items' job ids.")] = None,
    all_items: Annotated[bool, typer.Option("--all", help="Every kept item.")] = False,
) -> None:
    """Route kept inputs again, after a rule that takes them was added: each goes back to the
    spool and is queued; one still no rule takes is kept again."""
    from pipeline.ops import unrouted
    from pipeline.tasks import broker
    from pipeline.tasks.app import make_celery
    from pipeline.tasks.enqueue import producer

    if not item_ids and not all_items:
        raise fail("name the items to retry, or --all")
    settings = load()
    queue = producer(settings, make_celery(settings, broker.broker_url(settings))).enqueue
    outcomes = unrouted.retry_all(settings, queue) if all_items else []
    for item_id in item_ids or []:
        try:
            outcomes.append(
                (unrouted.retry(settings, unrouted.find(settings, item_id), queue), True)
            )
        except PipelineError as exc:
            outcomes.append((str(exc), False))
    raise retried(outcomes)
