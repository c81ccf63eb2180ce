"""End-to-end benchmark: a CT study sent by C-STORE to `dicom-pipeline up`, until its results.

    python -m pipeline.bench.e2e [--studies 10] [--slices 200] [--size 256] [--burst 6] [--compare]

Latency: ``--studies`` CT studies (``--slices`` slices of ``--size``^2, the default routes:
classified, segmented, SR and SEG written), sent one after another; for each, the time from
the sender's last instance acknowledged to the study's last result on disk, split into the
completion wait (until the receiver hands the study over: at the association's release with
early start, else release + grace) and the rest (queue, load, preprocess, Triton, outputs);
and apart from the model compute (the Triton calls' time, summed), which the goal "2 s plus
model compute" leaves out. With early start, ``grace_end`` is when results may be written at
the earliest (release + grace): processing that ends before it waits. p50 and p95.
Throughput: ``--burst`` studies sent at once, studies per minute, with 1 and with 2 worker
processes (a fresh `up` each). Writes the figures as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.bench.load import percentile, start_up
from pipeline.core.filekinds import collect
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.outputs.send import scu
from pipeline.runtime.process import free_port


def _send(folder: Path, port: int) -> float:
    """Sends the folder on one association; returns when it was released, every instance
    acknowledged (epoch seconds)."""
    report = scu.send(collect([folder])[0], scu.Peer("127.0.0.1", port, "PIPELINE"))
    if not report.ok:
        raise RuntimeError(f"{len(report.failed)} instance(s) not sent")
    return time.time()


def _job(data: Path, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The job's job.json: in the spool until the worker archives it, a moment after
    study.json is written."""
    deadline = time.monotonic() + timeout
    while True:
        for folder in ("archive", "spool"):
            try:
                return dict(json.loads((data / folder / job_id / "job.json").read_text()))
            except FileNotFoundError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id}: no job.json in archive or spool")
        time.sleep(0.05)


def _finished(results: Path, study_uid: str, timeout: float = 900.0) -> dict[str, float]:
    """When the receiver handed the study over and queued it, when its last result was on
    disk (epoch seconds), and where the time in between went (seconds): waiting in the queue,
    preprocessing and Triton calls (summed over the study's results), the rest (reading the
    series, post-processing, SR and SEG, writing)."""
    study = results / study_uid / "study.json"
    deadline = time.monotonic() + timeout
    while not study.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no results for {study_uid} after {timeout:.0f} s")
        time.sleep(0.05)
    docs = [json.loads(p.read_text()) for p in study.parent.rglob("result.json")]
    timings = [d["timings"] for d in docs]
    handed_over = min(datetime.fromisoformat(t["queued"]).timestamp() for t in timings)
    hold = _job(results.parent, docs[0]["job_id"])["study"].get("hold_until")
    started = min(datetime.fromisoformat(t["started"]).timestamp() for t in timings)
    last = max(p.stat().st_mtime for p in study.parent.rglob("*.json"))
    inference = sum(t["inference_ms"] for t in timings) / 1000.0
    preprocess = sum(t["preprocess_ms"] for t in timings) / 1000.0
    return {
        "handed_over": handed_over,
        "grace_end": datetime.fromisoformat(hold).timestamp() if hold else handed_over,
        "last": last,
        "queue": started - handed_over,
        "inference": inference,
        "preprocess": preprocess,
        "rest": last - started - inference - preprocess,
    }


def _studies(work: Path, count: int, slices: int, size: int) -> list[tuple[Path, str]]:
    out = []
    for i in range(count):
        spec = new_series(slices=slices, rows=size, cols=size)
        write_series(work / f"{i:02d}", spec, seed=i)
        out.append((work / f"{i:02d}", spec.study_uid))
    # The sender's files (some 260 MB for 10 studies) are flushed now: else the kernel writes
    # them back some 30 s later, during the first studies, and their fsyncs wait behind it.
    os.sync()
    return out


_PARTS = ("total", "inference", "queue", "preprocess", "rest")


def latency(args: argparse.Namespace, work: Path, early_start: bool = True) -> dict[str, Any]:
    name = "latency" if early_start else "latency-late"
    studies = _studies(work / name, args.studies, args.slices, args.size)
    port = free_port()
    env = {"PIPELINE_RECEIVER__EARLY_START": str(early_start).lower()}
    up = start_up(work / f"up-{name}", port, 4, env)
    parts: dict[str, list[float]] = {
        k: []
        for k in ("total", "wait", "grace_end", "after", "queue", "preprocess", "inference", "rest")
    }
    try:
        for folder, uid in studies:
            acked = _send(folder, port)
            done = _finished(work / f"up-{name}" / "data" / "results", uid)
            parts["total"].append(done["last"] - acked)
            parts["wait"].append(done["handed_over"] - acked)
            parts["grace_end"].append(done["grace_end"] - acked)
            parts["after"].append(done["last"] - done["handed_over"])
            for key in ("queue", "preprocess", "inference", "rest"):
                parts[key].append(done[key])
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    beyond = [t - i for t, i in zip(parts["total"], parts["inference"], strict=True)]
    return {
        "studies": len(parts["total"]),
        "total_p50_s": round(percentile(parts["total"], 0.5), 2),
        "total_p95_s": round(percentile(parts["total"], 0.95), 2),
        "completion_wait_p50_s": round(percentile(parts["wait"], 0.5), 2),
        "grace_end_p50_s": round(percentile(parts["grace_end"], 0.5), 2),
        "after_completion_p50_s": round(percentile(parts["after"], 0.5), 2),
        "after_completion_p95_s": round(percentile(parts["after"], 0.95), 2),
        # The goal's terms: model compute (the Triton calls) and everything else.
        "model_compute_p50_s": round(percentile(parts["inference"], 0.5), 2),
        "beyond_compute_p50_s": round(percentile(beyond, 0.5), 2),
        "beyond_compute_p95_s": round(percentile(beyond, 0.95), 2),
        "breakdown_p50_s": {
            k: round(percentile(parts[k], 0.5), 2) for k in ("queue", "preprocess", "rest")
        },
        # In sending order: whether a p95 is one slow study (the first, say) or a spread.
        "per_study_s": [
            {"beyond_compute": round(b, 2), **{k: round(parts[k][i], 2) for k in _PARTS}}
            for i, b in enumerate(beyond)
        ],
    }


def throughput(args: argparse.Namespace, work: Path, workers: int) -> float:
    studies = _studies(work / f"burst-{workers}", args.burst, args.slices, args.size)
    port = free_port()
    folder = work / f"up-{workers}-workers"
    up = start_up(folder, port, args.burst, {"PIPELINE_WORKER__CONCURRENCY": str(workers)})
    try:
        started = time.time()
        threads = [threading.Thread(target=_send, args=(f, port)) for f, _ in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = max(_finished(folder / "data" / "results", uid)["last"] for _, uid in studies)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    return round(len(studies) / (last - started) * 60, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--burst", type=int, default=6)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="Also measure latency with early start off (results after release + grace).",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        figures: dict[str, Any] = {"latency": latency(args, work)}
        if args.compare:
            figures["latency_without_early_start"] = latency(args, work, early_start=False)
        if args.burst:  # --burst 0: latency alone (a 2,000-slice CT, say)
            figures["studies_per_minute"] = {
                f"{n}_workers": throughput(args, work, n) for n in (1, 2)
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
