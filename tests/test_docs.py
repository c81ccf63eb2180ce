"""The docs name only what exists, and their generated pages are current: every
`dicom-pipeline` command, every setting (`section.key`, `PIPELINE_...`) and every benchmark
option named in the README and docs/ is checked against the code; no page tells development
history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.core.network_settings import Destination
from pipeline.core.settings import Settings

from . import reference

ROOT = reference.ROOT
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"dicom-pipeline ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)  # where a command is written: code, not prose
FILES = (".py", ".log", ".md", ".json", ".yaml", ".txt")
SECTIONS = ("triton", "inbox", "worker", "receiver", "output", "metrics", "web", "retention")


def _text() -> dict[Path, str]:
    return {p: p.read_text() for p in PAGES}


def _setting_keys() -> set[str]:
    keys = {path for path, _, _ in reference.fields(Settings)}
    keys |= {f"destinations.{p}" for p, _, _ in reference.fields(Destination)}
    return keys


def test_the_generated_reference_pages_are_current() -> None:
    assert not reference.stale(), "run: python -m tests.reference --write"


def test_every_command_the_docs_name_exists() -> None:
    commands = set(reference.command_names())
    groups = {c.split()[0] for c in commands if " " in c}
    named = {
        (page.name, m[1], m[2] or "")
        for page, text in _text().items()
        for code in CODE.findall(text)
        for m in COMMAND.finditer(code)
    }
    assert len(named) > 30
    unknown = [
        (page, cmd, sub)
        for page, cmd, sub in named
        if cmd not in commands and not (cmd in groups and f"{cmd} {sub}" in commands)
    ]
    assert not unknown, f"commands the code does not have: {unknown}"


def test_every_setting_the_docs_name_exists() -> None:
    keys = _setting_keys()
    env = {"PIPELINE_" + k.replace(".", "__").upper() for k in keys if "." not in k[13:]}
    env |= {"PIPELINE_CONFIG", "PIPELINE_SCU"}  # the file's variable; send's calling AE title
    pattern = re.compile(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_.]+)`")
    unknown = []
    for page, text in _text().items():
        if page.parent.name == "reference" and page.name != "settings.md":
            continue  # the contract's and the documents' own keys, generated from the code
        named = [m[1] for m in pattern.finditer(text) if not m[1].endswith(FILES)]
        unknown += [(page.name, key) for key in named if key not in keys]
        found = re.findall(r"PIPELINE_[A-Z_]+(?<!_)", text)
        unknown += [(page.name, v) for v in found if v not in env]
    assert not unknown, f"settings the code does not have: {unknown}"


def test_every_benchmark_option_the_docs_name_exists() -> None:
    pattern = re.compile(
        r"python -m pipeline\.bench\.([a-z0-9_]+)((?: --?[a-z][a-z-]*(?: [^ `-][^ `]*)?)*)"
    )
    checked = 0
    for page, text in _text().items():
        for m in pattern.finditer(text):
            source = (ROOT / "pipeline" / "bench" / f"{m[1]}.py").read_text()
            for flag in re.findall(r"--[a-z][a-z-]*", m[2]):
                assert f'"{flag}"' in source, f"{page.name}: {m[1]} has no {flag}"
                checked += 1
    assert checked > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_tells_development_history(page: Path) -> None:
    """What changed and when is CHANGELOG.md's; the docs say what the product does now."""
    history = re.compile(r"\bsession \d+|\bsessions? \d+ to \d+|\bnow fixed\b|\bbefore session\b")
    assert not history.findall(page.read_text())


def test_every_metric_the_docs_name_exists() -> None:
    defined = set(re.findall(r"`(dicom_pipeline_[a-z_]+)`", reference.metrics_page()))
    named = {
        (page.name, m)
        for page, text in _text().items()
        for m in re.findall(r"\b(dicom_pipeline_[a-z_]+?)(?:_bucket|_count|_sum)?\b", text)
    }
    assert len(named) > 10
    unknown = [(page, m) for page, m in named if m not in defined]
    assert not unknown, f"metrics the code does not have: {unknown}"
