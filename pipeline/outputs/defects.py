"""Which validation errors of a DICOM output its source gave it: a study UID under an illegal
root, a patient or study attribute the modality wrote out of its VR or left out, a reference to
the source's own (retired) SOP class. Such an error is the source's, and the same in any object
made from it; an error of our own making is not. An error names its attribute by path
(``</Sequence(gggg,eeee)[1]/Attribute(gggg,eeee)>``, as dciodvfy and the strict read-back
write it); it is inherited when that attribute holds a value one of the sources has for it (for
a reference, the source's SOP class or instance UID), or is missing as it is in every source."""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

_PATH = re.compile(r"</([^>]*)>|Element=<(\w+)>")
_STEP = re.compile(r"(\w+)\([0-9a-fA-F]{4},[0-9a-fA-F]{4}\)(?:\[(\d+)\])?")
# A reference's value is the source's own: the attribute it names in the source.
_REFERENCED = {
    "ReferencedSOPClassUID": "SOPClassUID",
    "ReferencedSOPInstanceUID": "SOPInstanceUID",
}
_MISSING = object()


def split(
    errors: list[str], ours: Dataset, sources: Iterable[Dataset]
) -> tuple[list[str], list[str]]:
    """(inherited, own): the errors the sources gave the object, and the rest."""
    headers = list(sources)
    inherited: list[str] = []
    own: list[str] = []
    for error in errors:
        (inherited if _inherited(error, ours, headers) else own).append(error)
    return inherited, own


def _inherited(error: str, ours: Dataset, sources: list[Dataset]) -> bool:
    found = _PATH.search(error)
    if found is None or not sources:
        return False  # says no attribute: ours, to be safe
    steps = [(m[1], int(m[2] or 1)) for m in _STEP.finditer(found[1] or "")]
    if found[2]:
        steps = [(found[2], 1)]
    if not steps:
        return False
    value = _value(ours, steps)
    keyword = _REFERENCED.get(steps[-1][0], steps[-1][0])
    theirs = [s.get(keyword, _MISSING) for s in sources]
    if value is _MISSING or value in ("", None):
        return all(v is _MISSING or v in ("", None) for v in theirs)
    return any(v is not _MISSING and str(v) == str(value) for v in theirs)


def _value(ds: Dataset, steps: list[tuple[str, int]]) -> object:
    """The value at the path, or _MISSING."""
    node: object = ds
    for keyword, index in steps:
        if not isinstance(node, Dataset) or keyword not in node:
            return _MISSING
        node = node[keyword].value
        if isinstance(node, Sequence):
            node = node[index - 1] if index <= len(node) else _MISSING
    return node
