"""`models list`, `models build-demo`, `models import-bundle`: the Triton model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.common import fail, load
from pipeline.core.errors import PipelineError

app = typer.Typer(no_args_is_help=True, help="The Triton model repository.")


@app.command("list")
def models_list() -> None:
    """The models in the repository, their inputs and labels, and whether weights are present."""
    from pipeline.core.contract import discover_contracts

    settings = load()
    repo = settings.triton.model_repository
    for name, c in discover_contracts(repo).items():
        weights = repo / name / "1" / c.weights
        state = "weights present" if weights.is_file() else "NO WEIGHTS (run models build-demo)"
        typer.echo(
            f"{name}: {c.spatial_dims}D {'/'.join(k.value for k in c.accepts)} -> "
            f"{', '.join(c.labels)} [{state}]"
        )


@app.command("build-demo")
def models_build_demo(
    force: Annotated[bool, typer.Option(help="Retrain even where weights exist.")] = False,
    model: Annotated[list[str] | None, typer.Option(help="Only this model (repeatable).")] = None,
) -> None:
    """Train demo weights on synthetic data (offline, CPU, a few minutes)."""
    import re

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from pipeline.demo.train import build_demo

    settings = load()
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


@app.command("import-bundle")
def models_import_bundle(
    bundle: Annotated[Path, typer.Argument(help="A MONAI bundle folder (configs/, models/).")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the bundle's).")] = None,
) -> None:
    """Turn a MONAI bundle into a Triton model folder with its preprocessing derived."""
    from pipeline.inference.bundle import import_bundle

    settings = load()
    try:
        contract = import_bundle(bundle, settings.triton.model_repository, name)
    except PipelineError as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"{contract.name}: {contract.task.value}, input {list(contract.input.shape)}, labels "
        f"{', '.join(contract.labels)}, preprocessing "
        f"{', '.join(t.name for t in contract.preprocessing) or 'none'}\n"
        f"written to {settings.triton.model_repository / contract.name}; add it to a route "
        "(docs/guides/routing.md) and restart Triton to serve it"
    )
