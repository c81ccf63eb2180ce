"""Unpacking a dropped zip: the watcher's unpack against Info-ZIP's ``unzip``.

    python -m pipeline.bench.unpack [--instances 500] [--size 256] [--repeats 3]

A synthetic CT series (a phantom with noise of 10 HU, so it does not deflate to nothing) is
zipped with deflate; then, alternating on the same disk with a warm page cache, our
``plan`` + ``unpack`` (every file fsynced and the folder renamed into view: a crash leaves
no half-unpacked study to be taken) and ``unzip -q`` (no sync) unpack it. The ratio is ours
over unzip's seconds, medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from pipeline import unpack
from pipeline.demo.dicom_series import new_series, write_series


def ours(archive_path: Path) -> None:
    """As the watcher does, beside the archive (a copy: unpack removes it)."""
    with unpack.open_archive(archive_path) as archive:
        unpack.unpack(archive_path, archive, unpack.plan(archive, 2**40))


def theirs(archive_path: Path) -> None:
    out = archive_path.parent / "out"
    subprocess.run(["unzip", "-q", str(archive_path), "-d", str(out)], check=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-unpack-"))
    try:
        paths = write_series(root / "ct", new_series(args.instances, args.size, args.size))
        archive_path = root / "ct.zip"
        with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as z:
            for path in paths:
                z.write(path, f"DICOM/{path.name}")
        times: dict[str, list[float]] = {"ours": [], "unzip": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("unzip", theirs)):
                work = root / f"work-{name}"
                work.mkdir()
                copy = work / archive_path.name
                shutil.copy(archive_path, copy)
                t0 = time.perf_counter()
                fn(copy)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(work)
        median = {k: statistics.median(v) for k, v in times.items()}
        return {
            "instances": args.instances,
            "zip_mb": round(archive_path.stat().st_size / 2**20, 1),
            "unpacked_mb": round(sum(p.stat().st_size for p in paths) / 2**20, 1),
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "ratio_ours_over_unzip": round(median["ours"] / median["unzip"], 2),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
