"""Receive benchmark: dcmtk storescu -> dcmtk storescp, and -> our receiver, in one run.

    python -m pipeline.bench.receive [--instances 500] [--size 512] [--repeats 3]

A synthetic CT series is sent over loopback with 1 and 4 associations (the series split in
four, four storescu processes) to storescp (one process; and ``--fork``, a process per
association) and to ``dicom-pipeline scp`` as a user runs it, and to the same receiver by
DICOMweb STOW-RS (curl posting the series as 1 and 4 concurrent multipart requests, built
beforehand), measurements interleaved so that drift hits all alike. Everyone runs with
TCP_NODELAY=1. Beside them, "durable write" writes the same files as our receiver does, each
fsynced with its folder before the next, from 1 and 4 threads, without network or DICOM: the
floor for any receiver that answers only once an instance is on disk (storescp answers before
the page cache reaches the disk). Prints instances/s (median of the repeats) and the ratios,
then the receiver's memory (RSS of its processes) while it takes ``--memory-instances`` more.
Writes the figures as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.fsutil import fsync_dir
from pipeline.core.jobs import ENQUEUED_MARKER
from pipeline.core.settings import Settings
from pipeline.demo.dicom_series import new_series, write_series
from pipeline.outputs.send import stow as stow_send
from pipeline.outputs.send.scu import Peer, echo
from pipeline.runtime import embedded_redis
from pipeline.runtime.process import descendants, free_port
from pipeline.tasks import broker

ENV = {**os.environ, "TCP_NODELAY": "1"}


def _storescu(port: int, files: list[Path], associations: int) -> float:
    """Seconds to send ``files`` split over ``associations`` concurrent storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", "PIPELINE", "127.0.0.1", str(port), *map(str, chunk)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for chunk in chunks
    ]
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"storescu failed: exit codes {codes}")
    return seconds


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants."""
    total_kb = 0
    for p in {pid, *descendants(pid)}:
        with contextlib.suppress(OSError):
            for line in (Path("/proc") / str(p) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


class Storescp:
    def __init__(self, work: Path, fork: bool) -> None:
        self.out = work / ("storescp-fork" if fork else "storescp")
        self.port = free_port()
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", *(["--fork"] if fork else []), "-od", str(self.out), str(self.port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: _echo(self.port), 30)

    def clear(self) -> None:
        for f in self.out.iterdir():
            f.unlink()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class DurableWrite:
    """Each file written to a temporary name, fsynced, renamed into a folder, folder fsynced."""

    def __init__(self, work: Path, files: list[Path]) -> None:
        self.out = work / "durable"
        self.data = [f.read_bytes() for f in files]

    def write(self, threads: int) -> float:
        self.out.mkdir(parents=True, exist_ok=True)
        shares = [range(i, len(self.data), threads) for i in range(threads)]
        workers = [threading.Thread(target=self._write, args=(share,)) for share in shares]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    def _write(self, share: range) -> None:
        for i in share:
            part = self.out / f"{i}.part"
            with part.open("wb") as f:
                f.write(self.data[i])
                os.fsync(f.fileno())
            os.replace(part, self.out / f"{i}.dcm")
            fsync_dir(self.out)

    def clear(self) -> None:
        shutil.rmtree(self.out)

    def stop(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)


class Ours:
    def __init__(self, work: Path, processes: int) -> None:
        self.data = work / "pipeline-data"
        self.port = free_port()
        self.stow_port = free_port()
        settings = Settings(data_dir=self.data)
        settings.ensure_dirs()
        self.redis = embedded_redis.start(settings)
        env = {
            **ENV,
            "PIPELINE_CONFIG": str(work / "empty.yaml"),
            "PIPELINE_DATA_DIR": str(self.data),
            "PIPELINE_BROKER_URL": broker.broker_url(settings),
            "PIPELINE_RECEIVER__HOST": "127.0.0.1",
            "PIPELINE_RECEIVER__PORT": str(self.port),
            "PIPELINE_RECEIVER__PROCESSES": str(processes),
            "PIPELINE_RECEIVER__RELEASE_GRACE_S": "0.5",
            "PIPELINE_RECEIVER__MIN_FREE_DISK_MB": "0",
            "PIPELINE_RECEIVER__DICOMWEB_PORT": str(self.stow_port),
            "PIPELINE_LOG_LEVEL": "WARNING",
        }
        (work / "empty.yaml").write_text("{}\n")
        log = work / "scp.log"
        log.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "scp"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )
        # It says "ready" once every receiving process listens; the first answers before.
        _wait(lambda: "DICOM receiver ready" in log.read_text(errors="replace"), 120)

    def clear(self) -> None:
        """Wait for the study to be handed over as a job, then drop the job folders."""
        spool = self.data / "spool"

        def handed_over() -> bool:
            folders = [p for p in spool.iterdir() if not p.name.startswith(".")]
            studies = [p for p in folders if "." in p.name]  # UIDs; job ids have no dot
            jobs = [p for p in folders if p not in studies]
            return bool(jobs) and not studies and all((p / ENQUEUED_MARKER).exists() for p in jobs)

        _wait(handed_over, 30)
        for p in spool.iterdir():
            if p.is_dir() and not p.name.startswith("."):
                shutil.rmtree(p)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.redis.stop()


class StowCurl:
    """The series posted to our receiver by STOW-RS: curl, one process per request, each
    sending its share of the files as one multipart body (written beforehand)."""

    BOUNDARY = "bench-boundary-7f3a"

    def __init__(self, work: Path, ours: Ours, files: list[Path]) -> None:
        self.ours = ours
        self.bodies: dict[int, list[Path]] = {}
        for n in (1, 4):
            self.bodies[n] = []
            for i in range(n):
                body = work / f"stow-{n}-{i}.body"
                with body.open("wb") as out:
                    out.writelines(stow_send.body(files[i::n], self.BOUNDARY))
                self.bodies[n].append(body)

    def send(self, requests: int) -> float:
        url = f"http://127.0.0.1:{self.ours.stow_port}/studies"
        kind = f'multipart/related; type="application/dicom"; boundary={self.BOUNDARY}'
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    *("curl", "-sSf", "-o", "/dev/null", "-H", f"Content-Type: {kind}"),
                    *("-H", "Expect:", "--data-binary", f"@{body}", url),
                ],
                stdout=subprocess.DEVNULL,
            )
            for body in self.bodies[requests]
        ]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"curl failed: exit codes {codes}")
        return seconds

    def clear(self) -> None:
        self.ours.clear()

    def stop(self) -> None:
        for bodies in self.bodies.values():
            for body in bodies:
                body.unlink(missing_ok=True)


def _echo(port: int) -> bool:
    try:
        return echo(Peer("127.0.0.1", port, "PIPELINE", timeout_s=5)) == 0
    except ConnectionError:
        return False


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("storescu") is None:
        raise SystemExit("dcmtk is needed: apt-get install dcmtk")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-receive-"))
    series = work / "series"
    if not series.is_dir():
        print(f"writing {args.instances} CT instances {args.size}x{args.size} ...", flush=True)
        write_series(series, new_series(args.instances, args.size, args.size))
    files = sorted(series.glob("*.dcm"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    ours = Ours(work, args.processes)
    targets: dict[str, Any] = {
        "storescp": Storescp(work, fork=False),
        "storescp --fork": Storescp(work, fork=True),
        f"ours ({args.processes} proc)": ours,
        "durable write": DurableWrite(work, files),
    }
    if shutil.which("curl"):
        targets["ours, STOW-RS"] = StowCurl(work, ours, files)
    rates: dict[str, dict[int, list[float]]] = {t: {1: [], 4: []} for t in targets}
    try:
        for r in range(args.repeats):
            for name, target in targets.items():
                for n in (1, 4):
                    if isinstance(target, DurableWrite):
                        seconds = target.write(n)
                    elif isinstance(target, StowCurl):
                        seconds = target.send(n)
                    else:
                        seconds = _storescu(target.port, files, n)
                    rates[name][n].append(len(files) / seconds)
                    target.clear()
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        memory = _memory(ours, files, args.memory_instances)
    finally:
        for target in targets.values():
            target.stop()
    medians = {t: {n: statistics.median(v) for n, v in by_n.items()} for t, by_n in rates.items()}
    result = {
        "instances": len(files),
        "megabytes": round(mb, 1),
        "repeats": args.repeats,
        "instances_per_s": {
            t: {str(n): round(v, 1) for n, v in m.items()} for t, m in medians.items()
        },
        "memory_mb": memory,
    }
    _print(result, medians, f"ours ({args.processes} proc)")
    return result


def _memory(ours: Ours, files: list[Path], total: int) -> list[float]:
    samples = [round(_tree_rss_mb(ours.proc.pid), 1)]
    sent = 0
    while sent < total:
        _storescu(ours.port, files, 4)
        ours.clear()
        sent += len(files)
        samples.append(round(_tree_rss_mb(ours.proc.pid), 1))
    return samples


def _print(result: dict[str, Any], medians: dict[str, dict[int, float]], ours: str) -> None:
    print(
        f"\n{result['instances']} instances, {result['megabytes']} MB, loopback, TCP_NODELAY=1,"
        f" median of {result['repeats']}"
    )
    print(f"{'receiver':<22}{'1 assoc/s':>12}{'4 assoc/s':>12}")
    for name, m in medians.items():
        print(f"{name:<22}{m[1]:>12.0f}{m[4]:>12.0f}")
    for ref in ("storescp", "storescp --fork", "durable write"):
        print(
            f"ratio ours/{ref:<16}{medians[ours][1] / medians[ref][1]:>11.2f}x"
            f"{medians[ours][4] / medians[ref][4]:>11.2f}x"
        )
    if "ours, STOW-RS" in medians:
        stow = medians["ours, STOW-RS"]
        print(
            f"{'ratio STOW-RS/C-STORE':<27}{stow[1] / medians[ours][1]:>11.2f}x"
            f"{stow[4] / medians[ours][4]:>11.2f}x"
        )
    mem = result["memory_mb"]
    print(f"receiver RSS (MB) after each {result['instances']} more: {mem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=Settings().receiver.processes)
    parser.add_argument("--memory-instances", type=int, default=5000)
    parser.add_argument("--workdir", help="Reuse this folder (keeps the generated series).")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
