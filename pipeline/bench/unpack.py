"""Unpacking a dropped zip: the watcher's unpack against Info-ZIP's ``unzip``.

    python -m pipeline.bench.unpack [--instances 500] [--size 256] [--repeats 3] [--beside]

A synthetic CT series (a phantom with noise of 10 HU, so it does not deflate to nothing) is
zipped with deflate; then, alternating on the same disk with a warm page cache, our
``plan`` + ``unpack`` (every file fsynced and the folder renamed into view: a crash leaves
no half-unpacked study to be taken) and ``unzip -q`` (no sync) unpack it. The ratio is ours
over unzip's seconds, medians.

``--beside`` runs the inbox watcher itself instead: the archive is dropped into its inbox and,
once unpacking has begun, a PNG beside it. It reports how long after its drop the PNG was
queued, and how long the archive took to unpack in the watcher against ``ours`` alone (the
watcher's work and the filesystem events of thousands of new files compete with it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core.jobs import Job
from pipeline.core.routing import Priority
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.demo.synthetic import write_mednist_png
from pipeline.ingest import unpack
from pipeline.ingest.handover import Producer
from pipeline.ingest.inbox import InboxWatcher


def ours(archive_path: Path) -> None:
    """As the watcher does, beside the archive (a copy: unpack removes it)."""
    with unpack.open_archive(archive_path) as archive:
        unpack.unpack(archive_path, archive, unpack.plan(archive, 2**40))


def theirs(archive_path: Path) -> None:
    out = archive_path.parent / "out"
    subprocess.run(["unzip", "-q", str(archive_path), "-d", str(out)], check=True)


def _ct_archive(root: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The zip of a synthetic CT series, and the series' files."""
    paths = write_series(root / "ct", new_series(args.instances, args.size, args.size))
    archive_path = root / "ct.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as z:
        for path in paths:
            z.write(path, f"DICOM/{path.name}")
    return archive_path, paths


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-unpack-"))
    try:
        archive_path, paths = _ct_archive(root, args)
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


def beside(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-unpack-"))
    try:
        archive_path, _ = _ct_archive(root, args)
        rounds = []
        for n in range(args.repeats):
            alone = root / f"alone-{n}"
            alone.mkdir()
            shutil.copy(archive_path, alone / archive_path.name)
            t0 = time.perf_counter()
            ours(alone / archive_path.name)
            rounds.append(
                {"alone_s": time.perf_counter() - t0, **_in_watcher(root, n, archive_path)}
            )
            shutil.rmtree(alone)
        median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        return {
            "instances": args.instances,
            "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
            "png_queued_s_median": round(median["png_queued_s"], 3),
            "ratio_unpack_in_watcher_over_alone": round(
                median["in_watcher_s"] / median["alone_s"], 2
            ),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _in_watcher(root: Path, n: int, archive_path: Path) -> dict[str, float]:
    settings = Settings(data_dir=root / f"data-{n}", inbox={"settle_seconds": 0.1})  # type: ignore[arg-type]
    settings.ensure_dirs()
    write_mednist_png(root / "hand.png", "Hand", n)
    queued: dict[str, float] = {}

    def send(job: Job) -> Priority:
        queued.setdefault(job.original_name, time.perf_counter())
        return Priority.ROUTINE

    stop = threading.Event()
    producer = Producer(settings.spool_dir, send)
    watcher = threading.Thread(target=InboxWatcher(settings, producer).run, args=(stop,))
    watcher.start()
    try:
        dropped = settings.inbox_dir / archive_path.name
        work, folder = unpack.work_folder(dropped), settings.inbox_dir / archive_path.stem
        shutil.copy(archive_path, root / "copy.zip")
        os.replace(root / "copy.zip", dropped)
        while not work.exists():
            time.sleep(0.001)
        t0 = time.perf_counter()
        os.replace(root / "hand.png", settings.inbox_dir / "hand.png")
        while not folder.exists():
            time.sleep(0.001)
        unpacked = time.perf_counter()
        while "hand.png" not in queued:
            time.sleep(0.001)
        return {"png_queued_s": queued["hand.png"] - t0, "in_watcher_s": unpacked - t0}
    finally:
        stop.set()
        watcher.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beside", action="store_true", help="in the inbox watcher, a PNG beside")
    args = parser.parse_args()
    print(json.dumps(beside(args) if args.beside else run(args), indent=2))


if __name__ == "__main__":
    main()
