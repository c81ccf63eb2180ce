"""Who may send: the receiver's ``allowed_networks``, checked alike for DICOM associations and
STOW-RS requests."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


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
