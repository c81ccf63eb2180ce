"""TLS contexts for DICOM associations (PS3.15 B.1: TLS 1.2 or newer)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(certificate: Path, private_key: Path, ca: Path | None) -> ssl.SSLContext:
    """With ``ca``, a peer must present a certificate signed by it (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate, private_key)
    if ca is not None:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca: Path | None,
    certificate: Path | None = None,
    private_key: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Verifies the server against ``ca`` (else the system store); a client certificate for
    receivers that require one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if certificate is not None:
        ctx.load_cert_chain(certificate, private_key)
    return ctx
