"""``dicom-pipeline route --explain``: the routing rules' verdicts, in words, without running
anything. DICOM files are grouped into series by their headers; other files are loaded to learn
their kind and size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.convert import grouping
from pipeline.convert import images as convert
from pipeline.core import routing
from pipeline.core.contract import InputKind
from pipeline.core.errors import PipelineError
from pipeline.core.filekinds import detect_kind, why_extra
from pipeline.studies.inputs import inbox_facts


def _verdicts(
    routes: tuple[routing.Route, ...], facts: routing.SeriesFacts, verbose: bool
) -> Iterator[str]:
    winner = routing.decide(routes, facts).route
    for rule in routes:
        failed = routing.mismatches(rule.match, facts)
        if rule is winner:
            urgent = " (urgent)" if rule.priority is routing.Priority.URGENT else ""
            yield f"  -> {rule.name}{urgent}: {', '.join(rule.models)}"
        elif verbose and failed:
            yield f"     {rule.name}: no ({'; '.join(failed)})"
        elif verbose:
            yield f"     {rule.name}: matches too, but {winner.name if winner else '?'} comes first"
    if winner is None:
        yield "  -> skipped: no rule matches" + ("" if verbose else " (--explain says why)")


def explain_paths(
    routes: tuple[routing.Route, ...],
    files: Sequence[Path],
    extras: Sequence[Path] = (),
    calling_aet: str = "",
    called_aet: str = "",
    verbose: bool = True,
) -> Iterator[str]:
    """Each series and file of ``files`` with its rule; ``extras``, a DICOM medium's other
    files (:func:`pipeline.core.filekinds.collect`), named as no image to route."""
    dicom: list[Path] = []
    other: list[Path] = []
    for f in files:
        kind = None
        with contextlib.suppress(PipelineError):
            kind = detect_kind(f)
        (other if kind in (InputKind.IMAGE, InputKind.NIFTI) else dicom).append(f)
    groups, skipped = grouping.group_series(dicom)
    for g in groups:
        facts = g.facts(calling_aet, called_aet)
        yield (
            f"series {g.uid} ({g.modality or '?'}, {g.description or 'no description'!r}, "
            f"{g.planes} slice(s), {len(g.paths)} file(s){', a volume' if g.volume else ''})"
        )
        yield from _verdicts(routes, facts, verbose)
    for f in other:
        try:
            image = convert.load(f)
            facts = inbox_facts(f, image)
        except (PipelineError, OSError) as exc:
            yield f"file {f.name}: not loadable ({exc})"
            continue
        yield f"file {f.name} ({facts.kind}, {image.spatial_dims}D, {facts.slices} slice(s))"
        yield from _verdicts(routes, facts, verbose)
    for s in skipped:
        yield f"not an image to route: {s.name}: {s.reason}"
    for f in extras:
        yield f"not an image to route: {f.name}: {why_extra(f)}"
