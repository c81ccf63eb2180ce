"""Validation of every DICOM object before it is written to results, on its encoded bytes (what
a PACS would receive), by one of two checks:

- ``dciodvfy`` (David Clunie's dicom3tools, ``apt-get install dicom3tools``) checks the object
  against its IOD (modules, types, conditions, code sequences) and every value against its VR
  (lengths, characters, formats). Its ``Error`` lines fail the object; its warnings are logged.
- Without it: the object is read back under pydicom's strict validation, which checks values
  against their VRs only, and less strictly (a lower-case code string, a malformed date or a
  person name of six components pass it; dciodvfy flags each).

dciodvfy rejects every bad value the strict read-back rejects (a test holds it to that), so
where it runs the object is not read back too: that read took 0.05-0.1 s an object, a third
of a CT study's outputs' checking. Either way the SOP class must be the one intended.

The errors are returned with the offending values withheld (they may be a patient's name);
:mod:`pipeline.outputs.dicom` decides what becomes of an object that has some.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

from pydicom import config, dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from pipeline.core.errors import OutputError, TransientError

log = logging.getLogger(__name__)

IodCheck = Literal["auto", "dciodvfy", "strict-read"]
DCIODVFY = "dciodvfy"
DCIODVFY_TIMEOUT_S = 120.0
_MAX_REASONS = 10
# Values quoted in validators' messages: dciodvfy's "= <value>", pydicom's 'value' or "value".
_DCIODVFY_VALUE = re.compile(r"= <[^>]*>")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _withhold(text: str) -> str:
    return _QUOTED.sub("'...'", _DCIODVFY_VALUE.sub("= <...>", text))


def dciodvfy_path(mode: IodCheck) -> str | None:
    """The dciodvfy to run, or None; OutputError when the configuration requires it."""
    if mode == "strict-read":
        return None
    found = shutil.which(DCIODVFY)
    if found is None and mode == "dciodvfy":
        raise OutputError("output.iod_check is dciodvfy but dciodvfy is not installed")
    return found


def encode_checked(ds: Dataset, sop_class_uid: str, mode: IodCheck) -> bytes:
    """The object as a DICOM file (preamble, meta), validated; OutputError says why not."""
    data, errors = check(ds, sop_class_uid, mode)
    if errors:
        raise OutputError(f"{mode_name(mode)}: {summary(errors)}")
    return data


def check(ds: Dataset, sop_class_uid: str, mode: IodCheck) -> tuple[bytes, list[str]]:
    """The object as a DICOM file, and its validation errors (values withheld): each names
    the attribute as ``</Sequence(gggg,eeee)[1]/Attribute(gggg,eeee)>`` where it can, so that
    :mod:`pipeline.outputs.defects` can tell those the object inherited from its source.
    OutputError when it cannot even be encoded."""
    if ds.get("SOPClassUID") != sop_class_uid:
        raise OutputError(f"SOP class {ds.get('SOPClassUID')} instead of {sop_class_uid}")
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"cannot be encoded: {exc}") from exc
    data = buffer.getvalue()
    tool = dciodvfy_path(mode)
    return data, _strict_read(data) if tool is None else _dciodvfy(tool, data)


def mode_name(mode: IodCheck) -> str:
    if dciodvfy_path(mode) is None:
        return "does not read back under strict validation"
    return "fails its IOD check (dciodvfy)"


def summary(errors: list[str]) -> str:
    shown = "; ".join(errors[:_MAX_REASONS])
    more = f" (+{len(errors) - _MAX_REASONS} more)" if len(errors) > _MAX_REASONS else ""
    return shown + more


def _strict_read(data: bytes) -> list[str]:
    try:
        with config.strict_reading():
            return _check_values(dcmread(io.BytesIO(data)), "")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; each means "invalid"
        return [_withhold(str(exc))]


def _check_values(ds: Dataset, path: str) -> list[str]:
    """Convert (and so validate) every value, naming the attribute that fails by its path."""
    errors = []
    for tag in list(ds.keys()):
        where = f"{path}/{keyword_for_tag(tag) or 'Unknown'}({tag.group:04x},{tag.elem:04x})"
        try:
            elem = ds[tag]  # a raw element is converted here, under the strict mode
        except Exception as exc:  # noqa: BLE001 - as above
            errors.append(f"<{where}>: {_withhold(str(exc))}")
            continue
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value, start=1):
                errors += _check_values(item, f"{where}[{i}]")
    return errors


def _dciodvfy(tool: str, data: bytes) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="iodcheck-") as tmp:
        path = Path(tmp) / "object.dcm"
        try:
            path.write_bytes(data)
        except OSError as exc:  # no room for the copy dciodvfy reads: try again later
            raise TransientError(f"cannot check a DICOM output: {exc}") from exc
        try:
            ran = subprocess.run(
                [tool, "-new", str(path)],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=DCIODVFY_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OutputError(f"dciodvfy could not check it: {exc}") from exc
    lines = (ran.stdout + ran.stderr).splitlines()
    errors = [_withhold(line.strip()) for line in lines if line.startswith("Error")]
    warnings = [_withhold(line) for line in lines if line.startswith("Warning")]
    if warnings:
        log.info("dciodvfy: %d warning(s), first: %s", len(warnings), warnings[0])
    if not errors and ran.returncode not in (0, 1):
        errors = [f"exit status {ran.returncode}"]
    return errors
