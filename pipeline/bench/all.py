"""`dicom-pipeline bench`: the five benchmarks in one go, one table, one JSON file.

Each runs in its own process (``python -m pipeline.bench.<name>``), one after another so they
do not disturb each other: receive (dcmtk storescu -> storescp and -> ours), convert (pydicom
raw read against series to volume), infer (the weights called directly against Triton), e2e (last
instance to result, and studies per minute with 1 and 2 workers), big_study (a lesion CT's
time and memory per step as it grows). ``quick`` shrinks every
size for a smoke run; its figures are not the ones to quote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FULL: dict[str, list[str]] = {
    "receive": [],
    "convert": [],
    "infer": [],
    "e2e": [],
    "big_study": [],
}
QUICK: dict[str, list[str]] = {
    "receive": ["--instances", "60", "--size", "128", "--repeats", "1", "--memory-instances", "60"],
    "convert": ["--instances", "60", "--size", "128", "--repeats", "1"],
    "infer": ["--seconds", "0.5", "--repeats", "1"],
    "e2e": ["--studies", "2", "--slices", "32", "--size", "64", "--burst", "2"],
    "big_study": ["--slices", "16", "32", "--size", "64"],
}


def run_all(
    quick: bool, model_repository: Path, on_step: Callable[[str], None] = lambda _n: None
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    # Every part (and the `up` the end-to-end part starts) serves this model repository.
    env = {**os.environ, "PIPELINE_TRITON__MODEL_REPOSITORY": str(model_repository.resolve())}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name, extra in (QUICK if quick else FULL).items():
            on_step(name)
            out = Path(tmp) / f"{name}.json"
            done = subprocess.run(
                [sys.executable, "-m", f"pipeline.bench.{name}", *extra, "--json", str(out)],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode != 0 or not out.exists():
                figures[name] = {"error": (done.stderr or done.stdout)[-2000:]}
                continue
            figures[name] = json.loads(out.read_text())
    return figures


def summary(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, figure, goal) rows for the ratios the goals are about."""
    rows: list[tuple[str, str, str]] = []
    receive = figures.get("receive", {}).get("instances_per_s", {})
    ours = next((v for k, v in receive.items() if k.startswith("ours")), None)
    if ours and "storescp" in receive:
        ref = receive["storescp"]
        rows.append(("receive, 1 association", f"{ours['1'] / ref['1']:.2f}x storescp", ""))
        rows.append(("receive, 4 associations", f"{ours['4'] / ref['4']:.2f}x storescp", ">= 0.5x"))
    convert = figures.get("convert", {})
    if "ratio" in convert:
        rows.append(("series to tensor", f"{convert['ratio']}x raw read", "<= 1.5x"))
    for model, runs in figures.get("infer", {}).items():
        if isinstance(runs, dict) and "grpc b16" in runs:
            best = max(runs["grpc b16"]["x_direct"], runs["http b16"]["x_direct"])
            rows.append((f"infer {model}, batch 16", f"{best:.2f}x direct", ">= 0.9x"))
            four = runs["grpc 4 clients b1"]["x_direct"]
            rows.append((f"infer {model}, 4 clients", f"{four:.2f}x direct b1", "> 1x"))
    e2e = figures.get("e2e", {})
    if "latency" in e2e:
        lat = e2e["latency"]
        rows.append(
            (
                "last instance -> result",
                f"p50 {lat['total_p50_s']} s, p95 {lat['total_p95_s']} s "
                f"(wait {lat['completion_wait_p50_s']} s)",
                "",
            )
        )
        if "beyond_compute_p50_s" in lat:
            rows.append(
                (
                    "  of which not model compute",
                    f"p50 {lat['beyond_compute_p50_s']} s (compute {lat['model_compute_p50_s']} s)",
                    "<= 2 s",
                )
            )
        for workers, rate in e2e.get("studies_per_minute", {}).items():
            rows.append((f"studies/min, {workers.replace('_', ' ')}", str(rate), ""))
    for run in figures.get("big_study", {}).get("runs", []):
        rows.append(
            (
                f"lesion CT, {run['slices']} slices",
                f"{run['x_linear_time']}x linear time, peak {run['peak_x_volume']}x volume",
                "<= 1.1x, <= 3x",
            )
        )
    for name, part in figures.items():
        if isinstance(part, dict) and "error" in part:
            rows.append((name, "failed: " + part["error"].strip().splitlines()[-1][:60], ""))
    return rows
