"""What intake refuses goes to ``data/failed/<id>/`` with ``error.json``, never left or dropped:
a file refused on its own (a symbolic link, a bad archive), or a dropped folder's files that are
not images (a CD's DICOMDIR, README and viewer), set aside together as one item."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_json, move_into
from pipeline.core.jobs import error_record, new_job_id, now


class IntakeFailures:
    """Failed intake items of one inbox, written into ``failed_dir``."""

    def __init__(self, failed_dir: Path, inbox: Path) -> None:
        self.failed_dir = failed_dir
        self.inbox = inbox

    def reject(self, path: Path, error: InputError, member: str | None = None) -> str | None:
        """Refused at intake: moved to failed/ with the reason, never left or dropped.
        ``member``: the archive member at fault, for error.json only. The item's id, or None
        when the file was moved away meanwhile by its owner."""
        fields: dict[str, object] = {"original_name": str(path.relative_to(self.inbox))}
        if member is not None:
            fields["member"] = member
        return self._to_failed([(path, Path())], error, fields)

    def _to_failed(
        self, moves: list[tuple[Path, Path]], error: InputError, fields: Mapping[str, object]
    ) -> str | None:
        """A new intake item in failed/: each path moved into its sub-folder there, and
        error.json; the item's id. A file moved away meanwhile by its owner is passed over;
        None, and no item, if all were."""
        job_id = new_job_id()
        folder = self.failed_dir / f".{job_id}"  # hidden until complete
        folder.mkdir(parents=True)
        moved = 0
        for path, under in moves:
            try:
                move_into(path, folder / under)
                moved += 1
            except FileNotFoundError:
                continue
        if not moved:
            shutil.rmtree(folder)
            return None
        record = {**error_record(error, "intake"), **fields}
        record["received_at"] = now().isoformat()
        atomic_write_json(folder / "error.json", record)
        os.replace(folder, self.failed_dir / job_id)
        return job_id

    def set_aside(self, entry: str, paths: list[Path], medium: bool) -> str | None:
        """Files of a dropped folder that are not images: one failed item for all of them,
        kept under their paths in the inbox, with what they are; the item's id."""
        names = [str(p.relative_to(self.inbox)) for p in paths]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if medium:
            what = (
                f"folder {entry!r} is a DICOM medium (it has a DICOMDIR): its DICOM files "
                f"went into their studies; its other {len(paths)} file(s) are not images"
            )
        else:
            what = f"{len(paths)} file(s) in folder {entry!r} are of no type the pipeline reads"
        error = InputError(
            f"{what}, and were set aside here: {shown} (the pipeline reads .png, .jpg, .nii, "
            ".nii.gz and DICOM image files)"
        )
        return self._to_failed(
            [(p, Path(n).parent) for p, n in zip(paths, names, strict=True)],
            error,
            {"original_name": entry, "files": names},
        )
