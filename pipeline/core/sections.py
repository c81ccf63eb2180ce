"""The sections of the settings (:mod:`pipeline.core.settings`) for Triton, the inbox, the
worker, outputs, metrics, the status page and retention; the DICOM network's are in
:mod:`pipeline.core.network_settings`. Each is frozen and refuses unknown keys."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.core.cpus import usable_cores


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TritonSettings(Section):
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
    startup_timeout_s: float = Field(
        default=240.0, gt=0, description="The embedded Triton must load its models within this."
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="One inference request; longer is a transient error."
    )
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


class InboxSettings(Section):
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
    poll_interval_s: float = Field(
        default=0.25, gt=0.0, description="How often the watcher looks at what is settling."
    )
    ignore_patterns: tuple[str, ...] = Field(
        default=("*.part", ".*", "*.tmp", "*.crdownload", "*.swp", "~*"),
        description="Names (fnmatch) never taken: files still being written.",
    )


MAX_TORCH_THREADS = 8


class WorkerSettings(Section):
    concurrency: int = Field(
        default=2, ge=1, le=64, description="Pool processes of a worker: jobs processed at once."
    )
    urgent_concurrency: int = Field(
        default=0,
        ge=0,
        le=64,
        description="`up` also runs a worker of this many pool processes that takes urgent "
        "jobs only (docs: Routing and urgent studies), so an urgent study never waits for "
        "routine tasks already running. 0: none; the worker takes urgent jobs first anyway. "
        "Each pool process holds its own memory (worker.prefault_mb and more).",
    )
    task_soft_time_limit_s: int = Field(
        default=540, gt=0, description="A job still running after this fails (kept in failed/)."
    )
    task_time_limit_s: int = Field(
        default=600,
        gt=0,
        description="A pool process still busy after this is replaced; its job is redelivered.",
    )
    max_retries: int = Field(
        default=12, ge=0, description="Retries of transient errors before the item fails."
    )
    retry_backoff_max_s: int = Field(
        default=300, gt=0, description="Longest wait between two tries of a transient error."
    )
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
    memory_budget_mb: int = Field(
        default=0,
        ge=0,
        description="Memory the studies in flight on this machine may use together, beyond "
        "the idle footprint of the worker pool and Triton. A volume costs about 3 times its "
        "float32 size (slices x rows x columns x 4 bytes x 3: 3 GB for 500 slices of 512x512) "
        "and waits until it fits beside those being processed; one larger than the budget "
        "fails at once. 0: nine tenths of the machine's (or its cgroup's) memory less what is "
        "in use while no study runs (docs: Sizing a worker).",
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


class OutputSettings(Section):
    manufacturer: str = Field(
        default="dicom-pipeline",
        max_length=64,
        description="Manufacturer written in every DICOM object made (the observer device's too).",
    )
    institution_name: str | None = Field(
        default=None, max_length=64, description="Institution Name written in DICOM SR."
    )
    iod_check: Literal["auto", "dciodvfy", "strict-read"] = Field(
        default="auto",
        description="How every DICOM output is validated before it is written: dciodvfy "
        "(dicom3tools) checks its IOD and every value's VR; strict-read reads it back under "
        "pydicom's strict validation (VRs only). auto: dciodvfy when installed, else "
        "strict-read; dciodvfy: required.",
    )
    source_defects: Literal["write", "withhold"] = Field(
        default="write",
        description="A DICOM output whose only validation errors came from its source (a "
        "study UID under an illegal root, a patient or study attribute out of its VR): "
        "write (written and sent, the errors listed in result.json's dicom_issues) or "
        "withhold (kept with the job's input, not sent). Errors of our own always withhold it.",
    )
    key_images: int = Field(
        default=5,
        ge=1,
        le=50,
        description="At most this many key images (route output sc) per result: the slices "
        "through the largest lesions, one per lesion. The KOS flags every lesion's slice.",
    )


class MetricsSettings(Section):
    """Prometheus endpoints (docs/reference/metrics.md), one per long-running component."""

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


class WebSettings(Section):
    """The read-only status page (`dicom-pipeline web`, part of `up`)."""

    enabled: bool = Field(default=True, description="Serve the page as part of `up`.")
    host: str = Field(default="127.0.0.1", description="Loopback by default: it shows results.")
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port.")
    refresh_s: int = Field(default=5, ge=1, le=3600, description="The page reloads this often.")


class RetentionSettings(Section):
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
    unrouted_days: float | None = Field(
        default=30.0,
        gt=0,
        description="Day records of inputs no rule took, and kept ones, under unrouted/.",
    )
