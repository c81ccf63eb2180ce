"""`pull`: studies retrieved from a PACS (`sources` in the configuration) and processed like
received ones. Thin wrapper over :mod:`pipeline.ingest.pull`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import load
from pipeline.core.routing import SeriesFacts, decide
from pipeline.core.settings import Settings
from pipeline.ingest.pull import peer, plan
from pipeline.ingest.pull.peer import Criteria, Match
from pipeline.ingest.pull.plan import Pull, PulledStudy
from pipeline.ingest.pull.run import find, has_results, record_unmatched, run_pull, series_of

_CSV = Annotated[
    Path | None,
    typer.Option("--csv", help="A CSV with a StudyInstanceUID or AccessionNumber column."),
]
_DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the matches and the routing, retrieve nothing.")
]
_Force = Annotated[
    bool, typer.Option("--force", help="Retrieve studies that already have results too.")
]


def pull(
    source: Annotated[str | None, typer.Argument(help="A name under `sources`.")] = None,
    study: Annotated[list[str], typer.Option(help="A StudyInstanceUID (repeatable).")] = [],  # noqa: B006
    accession: Annotated[list[str], typer.Option(help="An AccessionNumber (repeatable).")] = [],  # noqa: B006
    csv_file: _CSV = None,
    patient_id: Annotated[str, typer.Option(help="Query: the patient's ID.")] = "",
    date: Annotated[str, typer.Option(help="Query: date or range, 20260101-20260131.")] = "",
    modality: Annotated[str, typer.Option(help="Query: a modality in the study.")] = "",
    description: Annotated[str, typer.Option(help="Query: study description, * ?")] = "",
    dry_run: _DryRun = False,
    force: _Force = False,
    resume: Annotated[str | None, typer.Option(help="Continue a pull, by its id.")] = None,
) -> None:
    """Retrieve studies from a PACS and process them like received ones: by UID, accession
    number, a CSV of either, or a query. Prints what matched first; resumable."""
    settings = load()
    if resume is not None:
        _resume(settings, resume)
        return
    name = _source(settings, source)
    criteria = _criteria(study, accession, csv_file, patient_id, date, modality, description)
    _new_pull(settings, name, criteria, dry_run, force)


def _new_pull(
    settings: Settings, name: str, criteria: list[Criteria], dry_run: bool, force: bool
) -> None:
    """Find, print, and (unless a dry run) retrieve; exit code 1 if a criterion matched
    nothing or a study failed."""
    try:
        found, unmatched = _matches(settings, name, criteria)
    except peer.PeerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for what in unmatched:
        typer.echo(f"no match on {name}: {what}", err=True)
    if unmatched and not dry_run:
        record_unmatched(settings, name, unmatched)
    studies = [_listed(settings, m) for m in found]
    for item in studies if dry_run else []:
        typer.echo(f"  {item.study_uid}:")
        _explain(settings, name, item.study_uid)
    typer.echo(f"{len(studies)} studies matched on {name}")
    if dry_run or not studies:
        raise typer.Exit(1 if unmatched else 0)
    _retrieve(settings, plan.new_pull(settings.spool_dir, name, studies, force))
    if unmatched:
        raise typer.Exit(1)


def _resume(settings: Settings, pull_id: str) -> None:
    """Continue a pull: its pending studies, and those that failed, asked again."""
    try:
        chosen = plan.load(settings.spool_dir, pull_id)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for item in chosen.studies:
        if item.state == "failed":
            item.state, item.reason = "pending", None
    _retrieve(settings, chosen)


def _listed(settings: Settings, m: Match) -> PulledStudy:
    """A match, printed (UID, accession, date, modalities, description, instances; no patient
    data) and made an item of the pull's list."""
    done = " (has results: skipped unless --force)" if has_results(settings, m.study_uid) else ""
    typer.echo(
        f"{m.study_uid}  {m.accession or '-'}  {m.date or '-'}  {m.modalities or '-'}  "
        f"{m.description or '-'}  {m.instances if m.instances is not None else '?'} "
        f"instances{done}"
    )
    return PulledStudy(
        study_uid=m.study_uid,
        accession=m.accession,
        date=m.date,
        modalities=m.modalities,
        description=m.description,
        expected=m.instances,
        sop_classes=list(m.sop_classes),
    )


def _source(settings: Settings, source: str | None) -> str:
    if source is None or source not in settings.sources:
        known = ", ".join(settings.sources) or "none configured"
        typer.echo(f"error: name a source to pull from ({known}); see `sources`", err=True)
        raise typer.Exit(2)
    return source


def _criteria(
    studies: list[str],
    accessions: list[str],
    csv_file: Path | None,
    patient_id: str,
    date: str,
    modality: str,
    description: str,
) -> list[Criteria]:
    found = [Criteria(study_uid=u) for u in studies] + [Criteria(accession=a) for a in accessions]
    if csv_file is not None:
        with csv_file.open(newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                if uid := (row.get("StudyInstanceUID") or "").strip():
                    found.append(Criteria(study_uid=uid))
                elif number := (row.get("AccessionNumber") or "").strip():
                    found.append(Criteria(accession=number))
    if patient_id or date or modality or description:
        found.append(Criteria("", "", patient_id, date, modality, description))
    if not found:
        typer.echo("error: say what to pull: --study, --accession, --csv or a query", err=True)
        raise typer.Exit(2)
    return found


def _matches(
    settings: Settings, name: str, criteria: list[Criteria]
) -> tuple[list[Match], list[str]]:
    source = settings.sources[name]
    found: dict[str, Match] = {}
    unmatched = []
    for c in criteria:
        got = find(source, c)
        if not got:
            unmatched.append(_said(c))
        found.update({m.study_uid: m for m in got})
    return list(found.values()), unmatched


def _said(c: Criteria) -> str:
    """A criterion in words, the patient's ID left out (it is not for logs or terminals)."""
    shown = {"study UID": c.study_uid, "accession": c.accession, "date": c.study_date}
    shown |= {"modality": c.modality, "description": c.description}
    return ", ".join(f"{k} {v}" for k, v in shown.items() if v) or "query"


def _explain(settings: Settings, name: str, study_uid: str) -> None:
    """What `route --explain` would decide for each series, from the PACS's description."""
    for series in series_of(settings.sources[name], study_uid):
        count = str(series.get("NumberOfSeriesRelatedInstances", "") or "0")
        facts = SeriesFacts(
            kind="dicom",
            slices=int(count) if count.isdigit() else 0,
            volume=count.isdigit() and int(count) > 1,
            modality=str(series.get("Modality", "")),
            body_part=str(series.get("BodyPartExamined", "")),
            series_description=str(series.get("SeriesDescription", "")),
        )
        decision = decide(settings.routes, facts)
        verdict = (
            f"rule {decision.route.name}: {', '.join(decision.route.models)}"
            if decision.route
            else "no rule takes it"
        )
        typer.echo(f"    series {facts.modality} {facts.series_description!r} ({count}): {verdict}")


def _retrieve(settings: Settings, chosen: Pull) -> None:
    """Run the pull with a progress bar (studies, and the instances of those in progress),
    a line per study as it ends, and the totals; exit code 1 if a study failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pipeline.tasks.enqueue import producer  # Celery, imported when there is work

    total = len(chosen.studies)
    handed = producer(settings)
    typer.echo(f"pull {chosen.id}: {len(chosen.pending)} studies to retrieve")
    with Progress(
        "{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        bar = progress.add_task("studies", total=total, completed=total - len(chosen.pending))

        def report(study: PulledStudy) -> None:
            if study.state == "pending":  # an update while its instances arrive
                progress.update(bar, description=f"studies ({study.received} instances)")
                return
            progress.advance(bar)
            end = study.reason or (f"job {study.job_id}" if study.job_id else "")
            done = total - chosen.counts()["pending"]
            progress.console.print(
                f"[{done}/{total}] {study.study_uid} {study.state}: "
                f"{study.received} instances {end}".rstrip(),
                highlight=False,
                soft_wrap=True,
            )

        run_pull(settings, chosen, handed.close, report)
    counts = chosen.counts()
    again = f" (`dicom-pipeline pull --resume {chosen.id}` asks again)" if counts["failed"] else ""
    typer.echo(
        f"pull {chosen.id}: {counts['done']} retrieved, {counts['skipped']} skipped, "
        f"{counts['failed']} failed{again}"
    )
    if counts["failed"]:
        raise typer.Exit(1)


def rerun(
    study_uid: Annotated[str, typer.Argument(help="The study's StudyInstanceUID.")],
) -> None:
    """Process a study again from its archived inputs (no PACS involved); its new results
    supersede the earlier ones."""
    from pipeline.core.errors import PipelineError
    from pipeline.ingest.pull.rerun import rerun_study
    from pipeline.tasks.enqueue import producer

    settings = load()
    try:
        job = rerun_study(settings, study_uid, producer(settings).close)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    assert job.study is not None
    typer.echo(f"study {study_uid}: job {job.id}, {job.study.instances} instances")
