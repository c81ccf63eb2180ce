"""Load benchmark: many studies at once through `dicom-pipeline up`, as users would send them.

    python -m pipeline.bench.load [--associations 20] [--instances 100] [--size 64] [--files 200]
                                  [--urgent [--reserved]] [--rounds 1]

Starts ``up`` in a fresh data folder, then at the same moment opens ``--associations``
concurrent associations (one ``dicom-pipeline send`` each, a CT study of ``--instances`` slices
of ``--size`` squared) and drops ``--files`` PNGs into the inbox. Waits until every study and
file has its results, and checks that nothing failed or was done twice. Prints items per minute
and the p50/p95 latency from the moment an item was in (the sender's last instance
acknowledged, or the file dropped) to its last ``result.json`` on disk. Writes the figures as
JSON with ``--json``. Needs the demo weights (``dicom-pipeline models build-demo``).

``--urgent`` runs the burst twice per round: once an urgent study (sent by ``ER_CT`` once
the burst is in, and taken by a rule of its own) goes through its rule's ``priority: urgent``
lane, once the same rule is routine, in alternating order from round to round; it prints that
study's latency in each run and their ratio. With ``--reserved`` both runs have the urgent
lane, and one of them also the worker ``up`` keeps for it (``worker.urgent_concurrency: 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.core.routing import DEFAULT_ROUTES, Match, Priority, Route
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.demo.synthetic import MEDNIST_LABELS, write_mednist_png
from pipeline.runtime.process import free_port

URGENT_AET = "ER_CT"


def start_up(
    work: Path,
    port: int,
    associations: int,
    extra_env: dict[str, str] | None = None,
    urgent: Priority | None = None,
) -> subprocess.Popen[bytes]:
    """`dicom-pipeline up` in ``work``, receiver on loopback ``port``, once ready; with
    ``urgent``, a first rule for what ``URGENT_AET`` sends, in that lane."""
    work.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        # Room for every association at once (the default, 16, would make some senders retry).
        "receiver": {"max_associations": associations + 5},
    }
    if urgent is not None:
        emergency = Route(
            name="emergency",
            match=Match(kind=("dicom",), calling_aet=(URGENT_AET,)),
            models=DEFAULT_ROUTES[0].models,
            priority=urgent,
        )
        config["routes"] = [r.model_dump(mode="json") for r in (emergency, *DEFAULT_ROUTES)]
    (work / "config.yaml").write_text(json.dumps(config))  # YAML reads JSON
    env = {
        **os.environ,
        "PIPELINE_DATA_DIR": str(work / "data"),
        "PIPELINE_CONFIG": str(work / "config.yaml"),
        "PIPELINE_RECEIVER__HOST": "127.0.0.1",
        "PIPELINE_RECEIVER__PORT": str(port),
        "PIPELINE_INBOX__SETTLE_SECONDS": "0.5",
        "PIPELINE_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    log = (work / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "up"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while "ready." not in (work / "up.log").read_text():
        if up.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"`up` did not start; see {work / 'up.log'}")
        time.sleep(0.5)
    return up


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(
    args: argparse.Namespace, urgent: Priority | None = None, reserved: bool = False
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    port = free_port()
    studies = []
    for i in range(args.associations + (urgent is not None)):
        spec = new_series(slices=args.instances, rows=args.size, cols=args.size)
        write_series(work / "studies" / f"{i:02d}", spec, seed=i)
        studies.append(spec.study_uid)
    staging = work / "staging"
    staging.mkdir()
    for i in range(args.files):
        write_mednist_png(staging / f"{i:03d}.png", MEDNIST_LABELS[i % 6], 10_000 + i)
    reserve = {"PIPELINE_WORKER__URGENT_CONCURRENCY": "1"} if reserved else {}
    up = start_up(work, port, args.associations, reserve, urgent=urgent)
    data = work / "data"
    try:
        acked: dict[str, float] = {}  # study UID or file name -> when it was in

        def send(i: int, aet: str = "PIPELINE_SCU") -> None:
            folder = work / "studies" / f"{i:02d}"
            command = ["send", str(folder), "--port", str(port), "--calling-aet", aet]
            done = subprocess.run([sys.executable, "-m", "pipeline", *command], capture_output=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.decode()[-500:])
            acked[studies[i]] = time.time()

        started = time.time()
        senders = [threading.Thread(target=send, args=(i,)) for i in range(args.associations)]
        for t in senders:
            t.start()
        for path in sorted(staging.iterdir()):
            os.replace(path, data / "inbox" / path.name)
            acked[path.name] = time.time()
        for t in senders:
            t.join()
        if urgent is not None:  # behind the burst, which the workers are still busy with
            send(args.associations, URGENT_AET)
        finished: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        expected = len(studies) + args.files
        while len(finished) < expected and time.monotonic() < deadline:
            finished = _finished(data, studies)
            time.sleep(1.0)
        failed = list((data / "failed").iterdir())
        results = list((data / "results").rglob("result.json"))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    latencies = [finished[k] - acked[k] for k in finished if k in acked]
    wall = max(finished.values()) - started if finished else float("nan")
    figures = {
        "associations": args.associations,
        "instances_per_study": args.instances,
        "inbox_files": args.files,
        "completed": len(finished),
        "expected": expected,
        "failed": len(failed),
        "result_files": len(results),
        "items_per_minute": round(len(finished) / wall * 60, 1),
        "studies_per_minute": round(sum(k in finished for k in studies) / wall * 60, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 2),
        "latency_p95_s": round(percentile(latencies, 0.95), 2),
        "study_latency_p50_s": round(
            statistics.median([finished[s] - acked[s] for s in studies if s in finished]), 2
        ),
        "wall_s": round(wall, 1),
    }
    if urgent is not None:
        last = studies[-1]
        figures["urgent_study_latency_s"] = round(finished[last] - acked[last], 2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def _finished(data: Path, studies: list[str]) -> dict[str, float]:
    """When each item's last result.json appeared (a study: both models and study.json)."""
    done: dict[str, float] = {}
    for study in studies:
        marker = data / "results" / study / "study.json"
        if marker.exists():
            done[study] = max(p.stat().st_mtime for p in marker.parent.rglob("*.json"))
    for path in (data / "results").glob("*/mednist_classifier/result.json"):
        name = json.loads(path.read_text())["input"]["name"]
        done[name] = path.stat().st_mtime
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="Rows and columns of each slice.")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument(
        "--urgent",
        action="store_true",
        help="An urgent study behind the burst, with and without its lane, alternating.",
    )
    parser.add_argument("--rounds", type=int, default=1, help="With --urgent: pairs of runs.")
    parser.add_argument(
        "--reserved",
        action="store_true",
        help="With --urgent: the urgent lane with and without a worker kept for it.",
    )
    args = parser.parse_args()
    # The pair each round compares, the better one first: (name, lane, worker kept for it).
    pair = (
        [
            ("urgent lane, worker kept", Priority.URGENT, True),
            ("urgent lane", Priority.URGENT, False),
        ]
        if args.reserved
        else [
            ("emergency rule urgent", Priority.URGENT, False),
            ("emergency rule routine", Priority.ROUTINE, False),
        ]
    )
    if not args.urgent:
        runs = {"burst": run(args)}
    else:
        # Each round in the other order: a run's place in the sequence is not taken for the
        # difference.
        runs = {
            f"round {r + 1}, {name}": run(args, lane, reserved)
            for r in range(args.rounds)
            for name, lane, reserved in pair[:: 1 if r % 2 == 0 else -1]
        }
    for name, figures in runs.items():
        print(name)
        for key, value in figures.items():
            print(f"{key:>24}: {value}")
    for r in range(args.rounds if args.urgent else 0):
        better, other = (
            runs[f"round {r + 1}, {name}"]["urgent_study_latency_s"] for name, *_ in pair
        )
        print(
            f"round {r + 1}: the urgent study's latency {better} s with {pair[0][0]}, {other} s "
            f"with {pair[1][0]} ({better / other:.2f}x)"
        )
    if args.json:
        out = runs if args.urgent else runs["burst"]
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = all(f["completed"] == f["expected"] and f["failed"] == 0 for f in runs.values())
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
