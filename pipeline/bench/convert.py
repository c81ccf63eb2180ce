"""Series-to-volume benchmark: pydicom's raw read against ``pipeline.convert.series.load_series``.

    python -m pipeline.bench.convert [--instances 500] [--size 512] [--repeats 9]

The raw read is the floor: ``dcmread`` each file, ``np.frombuffer`` its pixel data, sort by
position along the normal, stack, no rescale. Both run on the same files in the same process,
alternating, warm page cache, with numpy's huge-page advice off as in the worker
(``worker.numpy_huge_pages``; ``--huge-pages`` for numpy's default); peak memory is what
tracemalloc sees (numpy reports its buffers to it), as a multiple of the float32 volume.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from pipeline.convert.series import load_series, numpy_huge_pages
from pipeline.demo.dicom_series import new_series, write_series


def raw_read(paths: list[Path]) -> np.ndarray:
    slices = []
    for path in paths:
        ds = dcmread(path)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        z = float(np.array(ds.ImagePositionPatient, dtype=float) @ np.cross(iop[:3], iop[3:]))
        pixels = np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns)
        slices.append((z, pixels))
    slices.sort(key=lambda s: s[0])
    return np.stack([p for _, p in slices])


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_bytes(fn: Callable[[], Any]) -> int:
    """Measured in a separate run: tracing slows every allocation down."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    series = work / "series"
    if not series.is_dir():
        print(f"writing {args.instances} CT instances {args.size}x{args.size} ...", flush=True)
        write_series(series, new_series(args.instances, args.size, args.size))
    paths = sorted(series.glob("*.dcm"))
    raw_read(paths)  # warm the page cache
    runs: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw_read(paths),
        "ours": lambda: load_series(paths),
    }
    times: dict[str, list[float]] = {"raw": [], "ours": []}
    # As the worker runs (worker.numpy_huge_pages); switching back and forth within one
    # process fragments memory and slows whichever runs after a switch, so one choice per run.
    previous = numpy_huge_pages(args.huge_pages)
    try:
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(_seconds(fn))
        peaks = {name: _peak_bytes(fn) for name, fn in runs.items()}
    finally:
        numpy_huge_pages(previous)
    volume_bytes = len(paths) * args.size * args.size * 4
    raw_s, ours_s = statistics.median(times["raw"]), statistics.median(times["ours"])
    result = {
        "instances": len(paths),
        "numpy_huge_pages": args.huge_pages,
        "raw_read_s": round(raw_s, 3),
        "series_to_volume_s": round(ours_s, 3),
        "ratio": round(ours_s / raw_s, 2),
        "peak_memory_x_float32_volume": round(peaks["ours"] / volume_bytes, 2),
        "raw_peak_memory_x_float32_volume": round(peaks["raw"] / volume_bytes, 2),
    }
    print(
        f"{len(paths)} slices {args.size}x{args.size}, median of {args.repeats}, numpy huge "
        f"pages {'on' if args.huge_pages else 'off'}: raw read {raw_s:.3f} s, series to volume "
        f"{ours_s:.3f} s ({result['ratio']}x); peak memory "
        f"{result['peak_memory_x_float32_volume']}x the float32 volume "
        f"(raw read {result['raw_peak_memory_x_float32_volume']}x)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--huge-pages", action="store_true", help="numpy's default huge-page advice, on."
    )
    parser.add_argument("--workdir", help="Reuse this folder (keeps the generated series).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
