"""The settings of the DICOM network: the receiver (C-STORE, MPPS, STOW-RS), the
destinations results are sent to, and the sources studies are pulled from."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.sections import Section


def _check_ae_title(v: str) -> str:
    # PS3.5 AE: up to 16 characters of the default repertoire, no backslash or control chars.
    stripped = v.strip()
    if not stripped or len(v) > 16 or "\\" in v or not v.isascii() or not v.isprintable():
        raise ValueError(f"{v!r} is not a valid AE title (1-16 printable ASCII characters)")
    return stripped


class ReceiverSettings(Section):
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
    accept_modalities: tuple[str, ...] = Field(
        default=(),
        description="If set, instances of other modalities (C-STORE and STOW-RS) are "
        "acknowledged as stored and dropped at once, never spooled; counted in "
        "dicom_pipeline_instances_dropped_total. Never refused: a PACS would send them again.",
    )
    accept_sop_classes: tuple[str, ...] = Field(
        default=(),
        description="If set, instances of other SOP classes (UIDs) are acknowledged and "
        "dropped, as for accept_modalities.",
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
    network_timeout_s: float = Field(
        default=60.0, gt=0.0, description="An association silent this long is aborted."
    )
    acse_timeout_s: float = Field(
        default=30.0, gt=0.0, description="Longest wait for an association request or release."
    )
    dimse_timeout_s: float = Field(
        default=60.0, gt=0.0, description="Longest wait for the rest of a DIMSE message (C-STORE)."
    )
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


class _Peer(Section):
    """A DICOM peer: by DIMSE (``host``, ``port``, ``ae_title``) or DICOMweb (``url``)."""

    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    ae_title: str | None = Field(default=None, description="The peer's (called) AE title.")
    calling_ae_title: str = Field(default="PIPELINE", description="Ours, as it knows us.")
    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+",
        description="A DICOMweb service's base URL (https://archive/dicomweb), instead of "
        "host, port and ae_title.",
    )
    bearer_token_file: Path | None = Field(
        default=None,
        description="DICOMweb: a file holding an OAuth 2 bearer token, read at each request "
        "(whatever refreshes the token may rewrite it).",
    )
    tls: bool = False
    tls_ca: Path | None = Field(default=None, description="CA bundle to verify the peer.")
    tls_certificate: Path | None = Field(default=None, description="Client cert (mutual TLS).")
    tls_private_key: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0.0)

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _valid_aet(cls, v: str | None) -> str | None:
        return v if v is None else _check_ae_title(v)

    @model_validator(mode="after")
    def _one_way(self) -> _Peer:
        what = type(self).__name__.lower()
        dimse = (self.host, self.port, self.ae_title)
        if self.url is None and None in dimse:
            raise ValueError(f"a {what} needs host, port and ae_title (DIMSE) or url (DICOMweb)")
        if self.url is not None and dimse != (None, None, None):
            raise ValueError(f"a {what} has either url (DICOMweb) or host/port/ae_title")
        return self


class Destination(_Peer):
    """Where results are sent: a DICOM peer (PACS) by C-STORE, given ``host``, ``port`` and
    ``ae_title``; or a DICOMweb service by STOW-RS to ``<url>/studies``, given ``url``."""

    max_retries: int = Field(
        default=100,
        ge=0,
        description="Attempts while the destination is down or busy, with exponential backoff "
        "up to retry_backoff_max_s (the default rides out about 8 hours).",
    )
    retry_backoff_max_s: int = Field(
        default=300, gt=0, description="Longest wait between two attempts at sending."
    )


class Source(_Peer):
    """A PACS the pipeline pulls studies from (`dicom-pipeline pull`): by DIMSE, given
    ``host``, ``port`` and ``ae_title`` (C-FIND to find, C-GET or C-MOVE to retrieve); or a
    DICOMweb service, given ``url`` (QIDO-RS at <url>/studies to find, WADO-RS at
    <url>/studies/<uid> to retrieve)."""

    retrieve: Literal["get", "move"] = Field(
        default="get",
        description="DIMSE. get: C-GET, the instances come back on the pull's own association "
        "(the PACS needs to know nothing of us but our calling AE title). move: C-MOVE to "
        "move_destination, our receiver, which the PACS must know by AE title, host and port.",
    )
    move_destination: str | None = Field(
        default=None,
        description="retrieve: move: the AE title of our receiver as the PACS knows it "
        "(default: receiver.ae_title).",
    )
    max_parallel: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Studies retrieved at once: a PACS in clinical use must not be overloaded.",
    )
    pause_s: float = Field(
        default=1.0,
        ge=0.0,
        le=3600.0,
        description="Wait between one study's retrieve and the next.",
    )
    retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retrieves of a study that failed part-way, with backoff: what arrived is "
        "kept, the rest asked again.",
    )
    timeout_s: float = Field(default=60.0, gt=0.0)

    @field_validator("move_destination")
    @classmethod
    def _valid_destination(cls, v: str | None) -> str | None:
        return v if v is None else _check_ae_title(v)
