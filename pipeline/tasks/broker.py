"""Where the broker is and how to talk to it: the configured Redis, or the embedded one's Unix
socket in the data folder (derived from ``data_dir``, so every component agrees)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import redis

from pipeline.core.settings import Settings

_MAX_UNIX_SOCKET_PATH = 100  # sun_path holds 108 bytes; keep a margin


def socket_path(settings: Settings) -> Path:
    """Where the embedded Redis listens: derived from data_dir, so every component agrees."""
    run = settings.run_dir.resolve()
    path = run / "redis.sock"
    if len(str(path)) <= _MAX_UNIX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(run).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dicom-pipeline-{digest}.sock"


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded one's socket URL."""
    if settings.broker_url is not None:
        return settings.broker_url.get_secret_value()
    return f"redis+socket://{socket_path(settings)}"


def client(url: str, timeout: float = 1.0) -> redis.Redis:
    """A plain Redis client for a broker URL, Celery's redis+socket:// included."""
    if url.startswith("redis+socket://"):
        path = url.removeprefix("redis+socket://")
        return redis.Redis(unix_socket_path=path, socket_timeout=timeout)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def ping(url: str) -> bool:
    try:
        return bool(client(url).ping())
    except (redis.RedisError, OSError):
        return False
