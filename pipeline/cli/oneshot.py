"""`route` and `infer`: what the pipeline would do with files, without the queue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli.common import check_weights, collected, load, triton_url
from pipeline.core.settings import Settings

if TYPE_CHECKING:  # imported where used: the CLI starts without torch or MONAI
    pass


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

    settings = load()
    with collected(paths, settings) as (files, extras):
        lines = explain_paths(settings.routes, files, extras, calling_aet, called_aet, explain)
        for line in lines:
            typer.echo(line)


def infer(
    files: Annotated[
        list[Path], typer.Argument(help="PNG/JPEG, NIfTI or DICOM files, or folders of them.")
    ],
) -> None:
    """One-shot: convert each file, call Triton, print the prediction (no queue involved).
    DICOM files (named, or in folders named) are gathered into series, as the pipeline does.

    Uses triton.url, or a running embedded Triton, or starts one for the duration."""
    from pipeline.core.contract import discover_contracts
    from pipeline.inference.triton_client import TritonClient
    from pipeline.ops.infer import infer_lines
    from pipeline.studies.models import Models

    settings = load()
    settings.ensure_dirs()
    failures = 0
    with collected(files, settings) as (paths, extras), _triton(settings) as url:
        models = Models(discover_contracts(settings.triton.model_repository))
        with TritonClient(url, settings.triton) as client:
            for line in infer_lines(settings, paths, extras, models, client):
                failures += "error" in line
                typer.echo(json.dumps(line))
    raise typer.Exit(1 if failures else 0)


@contextmanager
def _triton(settings: Settings) -> Iterator[str]:
    """triton.url, or a running embedded Triton's, or one started for the duration."""
    from pipeline.inference.triton_client import TritonClient
    from pipeline.runtime import embedded_triton

    url = triton_url(settings)
    if url:
        with TritonClient(url, settings.triton) as probe:
            url = url if probe.is_ready() else None
    if url:
        yield url
        return
    check_weights(settings)
    typer.echo("starting embedded Triton for this run ...", err=True)
    proc, endpoints = embedded_triton.start(settings)
    try:
        yield endpoints.url
    finally:
        proc.stop()
