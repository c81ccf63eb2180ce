"""The package's layout holds: modules and functions readable in one sitting, commands thin,
the light commands free of torch, and the architecture page true to the tree. (The import
direction itself is import-linter's, in `make lint`.)"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import typer

from pipeline.cli.main import app

from .architecture import PAGE, ROOT, render
from .conftest import make_settings

PACKAGE = ROOT / "pipeline"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_COMMAND_LINES = 40
EXEMPT = ("bench", "demo")  # measurement and training scripts, run rather than read


def _held_to_the_rules() -> list[Path]:
    return [
        p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] not in EXEMPT
    ]


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return (node.end_lineno or node.lineno) - start + 1


def test_no_module_over_450_lines_and_no_function_over_60() -> None:
    too_long = []
    for path in _held_to_the_rules():
        text = path.read_text()
        where = path.relative_to(ROOT)
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {n} lines")
        functions = [
            node
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        too_long += [
            f"{where}:{f.lineno} {f.name}(): {_length(f)} lines"
            for f in functions
            if _length(f) > MAX_FUNCTION_LINES
        ]
    assert not too_long, "split these:\n" + "\n".join(too_long)


def _commands(group: typer.Typer) -> list[object]:
    found: list[object] = [c.callback for c in group.registered_commands]
    for sub in group.registered_groups:
        assert sub.typer_instance is not None
        found += _commands(sub.typer_instance)
    return found


def test_every_command_is_a_thin_wrapper() -> None:
    commands = _commands(app)
    assert len(commands) > 20  # every command of `dicom-pipeline --help`, groups' included
    too_long = []
    for command in commands:
        lines, _ = inspect.getsourcelines(command)  # type: ignore[arg-type]
        if len(lines) > MAX_COMMAND_LINES:
            too_long.append(f"{command.__module__}.{command.__qualname__}: {len(lines)} lines")  # type: ignore[attr-defined]
    assert not too_long, "move their work below the CLI:\n" + "\n".join(too_long)


def test_the_receiver_and_the_watcher_start_without_torch(tmp_path: Path) -> None:
    """`scp` and `watch` (and `up`'s own process) import neither torch nor MONAI: their
    start-up and memory stay small. Run as the commands run them, in a fresh interpreter."""
    settings = make_settings(tmp_path / "data", receiver={"port": 0, "processes": 1})
    script = textwrap.dedent(
        f"""
        import sys, threading
        from pathlib import Path
        from pipeline.cli import main
        from pipeline.core.settings import Settings
        from pipeline.ingest.receiver import Receiver
        from pipeline.runtime.up import run_watcher
        from pipeline.tasks.enqueue import producer

        settings = Settings.model_validate_json({settings.model_dump_json()!r})
        stop = threading.Event()
        Receiver(settings, producer(settings)).run(stop, on_ready=lambda *_: stop.set())
        stop = threading.Event()
        stop.set()  # one pass of the watcher's loop: its start-up, scan and requeue
        run_watcher(settings, stop)
        heavy = sorted(m for m in ("torch", "monai", "nibabel", "highdicom") if m in sys.modules)
        print("imported:", ",".join(heavy))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "imported:", done.stdout


def test_the_architecture_page_matches_the_tree() -> None:
    assert PAGE.read_text() == render(), "run: python -m tests.reference --write"
