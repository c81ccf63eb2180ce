"""`config show`, `config schema` and `schema`: the configuration and the result documents."""

from __future__ import annotations

import json

import typer

from pipeline.cli.common import load
from pipeline.core.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Show or describe the configuration.")


@app.command("show")
def config_show() -> None:
    """Print the effective settings (file + environment + defaults), secrets masked."""
    typer.echo(json.dumps(load().masked(), indent=2))


@app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the configuration file."""
    typer.echo(json.dumps(Settings.model_json_schema(), indent=2))


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
