"""`models list`, `models build-demo`, `models import-bundle`: the Triton model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.common import fail, load
from pipeline.core.contract import Backend
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
            f"{', '.join(c.labels)}, {c.weights_format.value} on {c.backend.value} [{state}]"
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


@app.command("add")
def models_add(
    weights: Annotated[Path, typer.Argument(help="The weights: .pt2, .onnx, .pt, .ts or .plan.")],
    name: Annotated[str, typer.Option(help="The new model's name.")],
    like: Annotated[str | None, typer.Option(help="Take this model's contract.")] = None,
    contract: Annotated[
        Path | None, typer.Option(help="A contract.yaml with the model's essentials.")
    ] = None,
    backend: Annotated[
        Backend | None,
        typer.Option(
            help="The Triton backend that serves it (default: the contract's, else "
            "onnxruntime for .onnx, tensorrt for .plan, python for .pt2, .pt and .ts)."
        ),
    ] = None,
) -> None:
    """Add a model from its weights file and a contract; served by Triton once restarted."""
    from pipeline.inference.model_folder import add_model

    settings = load()
    repo = settings.triton.model_repository
    try:
        made = add_model(repo, weights, name, like, contract, backend)
    except PipelineError as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"{made.name}: {made.weights_format.value} weights on the {made.backend.value} "
        f"backend, input {made.input.name} {list(made.input.shape)}, output "
        f"{made.output.name} {list(made.output.shape)}, labels {', '.join(made.labels)}; "
        f"written to {repo / made.name}. Restart Triton (or `up`) to serve it, then "
        f"`dicom-pipeline models check {made.name}`"
    )


@app.command("check")
def models_check(name: Annotated[str, typer.Argument(help="A model of the repository.")]) -> None:
    """Send the model a synthetic input of its contract's shape on the running Triton; print
    the answer's shape, dtype and time."""
    from pipeline.cli.common import triton_url
    from pipeline.core.contract import load_contract
    from pipeline.core.errors import ModelNotFoundError
    from pipeline.inference.model_check import check_model
    from pipeline.inference.triton_client import TritonClient

    settings = load()
    url = triton_url(settings)
    if url is None:
        raise fail("no Triton is running: start `dicom-pipeline up` (or set triton.url)")
    try:
        contract = load_contract(settings.triton.model_repository / name)
        with TritonClient(url, settings.triton) as client:
            checked = check_model(client, contract)
    except (OSError, ValueError, PipelineError) as exc:
        why = ""
        if isinstance(exc, ModelNotFoundError) and contract.backend is Backend.TENSORRT:
            why = " (a TensorRT plan needs Triton's tensorrt backend, which the embedded one lacks)"
        raise fail(f"{name}: {exc}{why}") from None
    typer.echo(
        f"{name} (version {checked.version}): output {list(checked.shape)} {checked.dtype} in "
        f"{checked.milliseconds} ms{'' if checked.finite else ', NOT FINITE'}"
    )
    if not checked.finite:
        raise typer.Exit(1)


@app.command("export")
def models_export(
    name: Annotated[str, typer.Argument(help="A demo model of the repository.")],
    to: Annotated[Path, typer.Argument(help="The file to write: .pt2, .onnx or .pt.")],
) -> None:
    """Write a demo model's weights in another format (torch.export, ONNX, TorchScript), to
    add as a model of its own (`models add`) or to serve by a native Triton backend."""
    from pipeline.core.contract import WEIGHT_FORMATS, load_contract
    from pipeline.core.fsutil import atomic_write_bytes
    from pipeline.demo.export import exported, from_program

    settings = load()
    folder = settings.triton.model_repository / name
    fmt = WEIGHT_FORMATS.get(to.suffix.lower())
    if fmt is None:
        raise fail(f"{to.name}: write .pt2, .onnx or .pt")
    try:
        contract = load_contract(folder)
        net = from_program(contract, folder / "1" / contract.weights)
    except (OSError, ValueError) as exc:
        raise fail(f"{name}: {exc}") from None
    atomic_write_bytes(to, exported(net, contract, fmt))
    typer.echo(f"{name}: {fmt.value} weights written to {to}")
