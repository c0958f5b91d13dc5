"""Instrument discovery: VXI-11 portmapper broadcast and LXI mDNS browsing → instrument events.

    inventory     sans-IO: observations in, instrument.appeared / .disappeared / .changed out (hysteresis,
                  grouping of one instrument's resources by manufacturer + serial)
    vxi11_scan    GETPORT broadcast per interface (sans-IO round + UDP transport)
    mdns          zeroconf browsing of the LXI service types, record → resource mapping
    mdns_probe    liveness probes for known mDNS services (one-shot unicast-answer queries)
    interfaces    configured interface names / addresses → IPv4 addresses and broadcast addresses
    service       DiscoveryService(config, emit): run(stop) continuously, or scan_once(timeout_s)
"""

from __future__ import annotations

from .interfaces import Interface, InterfaceError, resolve_interfaces
from .inventory import APPEARED, CHANGED, DISAPPEARED, Event, Inventory, Observation, Source
from .service import DiscoveryConfig, DiscoveryConfigError, DiscoveryService

__all__ = [
    "APPEARED",
    "CHANGED",
    "DISAPPEARED",
    "DiscoveryConfig",
    "DiscoveryConfigError",
    "DiscoveryService",
    "Event",
    "Interface",
    "InterfaceError",
    "Inventory",
    "Observation",
    "Source",
    "resolve_interfaces",
]
