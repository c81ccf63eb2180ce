"""Who may send and what is kept: the receiver's ``allowed_networks``, and its
``accept_modalities`` and ``accept_sop_classes``, checked alike for DICOM associations and
STOW-RS requests."""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable

from pipeline.core import observe

log = logging.getLogger(__name__)


class AllowedNetworks:
    """Addresses in any of the networks (CIDR) are admitted; every address when none is set."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def admit(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack socket
        return any(ip in net for net in self.networks)


class Accepted:
    """What may be kept: instances of ``accept_modalities`` and ``accept_sop_classes`` (every
    one when they are empty). Others are acknowledged and dropped: refusing them would make a
    PACS send them again and again. One log line per series (per process), not per instance."""

    _REMEMBERED = 4096  # series logged; then the memory starts again

    def __init__(self, modalities: Iterable[str], sop_classes: Iterable[str]) -> None:
        self.modalities = {m.strip().upper() for m in modalities}
        self.sop_classes = {c.strip() for c in sop_classes}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def keeps(self, series: str, modality: str, sop_class: str) -> bool:
        """False for an instance to drop (logged the first time for its series, counted)."""
        if (not self.modalities or modality.strip().upper() in self.modalities) and (
            not self.sop_classes or sop_class.strip() in self.sop_classes
        ):
            return True
        observe.count("dropped", modality, sop_class)
        with self._lock:
            first = series not in self._logged
            if len(self._logged) >= self._REMEMBERED:
                self._logged.clear()
            self._logged.add(series)
        if first:
            log.info(
                "series %s (modality %s, SOP class %s) is not accepted "
                "(receiver.accept_modalities, accept_sop_classes): acknowledged and dropped",
                series,
                modality or "(none)",
                sop_class or "(none)",
            )
        return False
