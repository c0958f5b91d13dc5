"""Which IPv4 interfaces discovery may use, from the config's list of names or addresses (psutil).

Discovery never sends anywhere else: broadcasts go to the directed broadcast address of each configured
interface, mDNS is bound to the configured addresses. A loopback address also gets unicast, because a
portmapper bound to 127.0.0.1 does not receive datagrams sent to 127.255.255.255.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import psutil


class InterfaceError(ValueError):
    """A configured interface does not exist or has no IPv4 address."""


@dataclass(frozen=True)
class Interface:
    name: str
    address: str
    netmask: str
    broadcast: str

    @property
    def is_loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_loopback

    @property
    def scan_targets(self) -> tuple[str, ...]:
        """Where a VXI-11 broadcast scan sends its GETPORT on this interface."""
        if self.is_loopback and self.broadcast != self.address:
            return (self.broadcast, self.address)
        return (self.broadcast,)


def _ipv4_interfaces() -> list[Interface]:
    found: list[Interface] = []
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family != socket.AF_INET or not addr.address:
                continue
            netmask = addr.netmask or "255.255.255.255"
            network = ipaddress.IPv4Network(f"{addr.address}/{netmask}", strict=False)
            # Computed, not taken from psutil: an address added without "brd" reports itself as its
            # broadcast address, and a GETPORT sent there would reach nobody.
            found.append(Interface(name, addr.address, netmask, str(network.broadcast_address)))
    return found


def resolve_interfaces(wanted: Iterable[str]) -> list[Interface]:
    """Map each configured entry (interface name such as "eth1", or one of its IPv4 addresses) to its
    IPv4 interface addresses. Raises InterfaceError naming the entry that matches nothing."""
    available = _ipv4_interfaces()
    chosen: list[Interface] = []
    for entry in wanted:
        if not isinstance(entry, str) or not entry.strip():
            raise InterfaceError(f"discovery interface {entry!r} is not an interface name or IPv4 address")
        entry = entry.strip()
        matches = [i for i in available if i.name == entry or i.address == entry]
        if not matches:
            names = ", ".join(sorted({f"{i.name} ({i.address})" for i in available})) or "none"
            raise InterfaceError(
                f"discovery interface {entry!r} has no IPv4 address on this host; available: {names}"
            )
        for match in matches:
            if match not in chosen:
                chosen.append(match)
    return chosen
