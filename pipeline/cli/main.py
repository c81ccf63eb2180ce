"""The ``dicom-pipeline`` command line: thin wrappers that build the settings once and call the
component functions, one module per command group. Errors of our own are printed as one clear
message and exit code 2."""

from __future__ import annotations

import typer

from pipeline.cli import config, dicom, models, oneshot, ops, pull, services, unrouted

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Medical image inference pipeline: inbox/DICOM -> Celery -> Triton -> results.",
)
app.add_typer(config.app, name="config")
app.add_typer(models.app, name="models")
app.add_typer(ops.failed_app, name="failed")
app.add_typer(unrouted.app, name="unrouted")
for command in (
    config.schema,
    services.redis,
    services.triton,
    services.worker,
    services.watch,
    services.scp,
    dicom.send,
    dicom.echo,
    pull.pull,
    pull.rerun,
    services.up,
    oneshot.route,
    oneshot.infer,
    ops.bench,
    ops.status,
    services.web,
    ops.prune,
):
    app.command()(command)


def main() -> None:
    app()
