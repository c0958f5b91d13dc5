"""mDNS / DNS-SD browsing for LXI instruments (python-zeroconf), bound to the configured interfaces.

`record_to_resource` is the pure part: one resolved service record → canonical resource + metadata, or
None (with a log line) when the record cannot name a usable resource. `MdnsBrowser` is the I/O part:
browses the LXI service types and reports found/updated/removed (goodbye or expired) records through a
callback. For liveness checks between announcements it can multicast a question for known services
(`query`) and tells which services were heard since (`take_heard`); `mdns_probe.MdnsProber` asks the same
question with a one-shot query that is answered by unicast.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from zeroconf import (
    DNSOutgoing,
    DNSQuestion,
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceBrowser,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError

from visabus.sdk.errors import InvalidResourceName
from visabus.sdk.resources import Protocol, Resource

log = structlog.get_logger(__name__)

HISLIP_TYPE = "_hislip._tcp.local."
VXI11_TYPE = "_vxi-11._tcp.local."
SCPI_RAW_TYPE = "_scpi-raw._tcp.local."
LXI_TYPE = "_lxi._tcp.local."
VICP_TYPE = "_vicp._tcp.local."
SERVICE_TYPES = (HISLIP_TYPE, VXI11_TYPE, SCPI_RAW_TYPE, LXI_TYPE, VICP_TYPE)
PORTMAPPER_PORT = 111
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
_TYPE_TXT = 16
_TYPE_SRV = 33
_CLASS_IN = 1
_FLAGS_QUERY = 0x0000
# An `_lxi._tcp` record from these makers is a scope that speaks VICP on its default port.
VICP_MANUFACTURERS = ("lecroy", "teledyne")
# LXI TXT keys (case-insensitive) → our metadata fields.
TXT_KEYS = {"manufacturer": "manufacturer", "model": "model", "serialnumber": "serial", "firmwareversion": "firmware"}

# (host, portmapper port) → VXI-11 core port, or None when the portmapper does not answer.
CorePortLookup = Callable[[str, int], "int | None"]


@dataclass(frozen=True)
class MdnsRecord:
    name: str  # service instance name, lower case: the record's identity across updates
    service_type: str
    resource: str
    protocol: str
    address: str
    metadata: dict[str, str] = field(default_factory=dict)


def txt_metadata(properties: Mapping[Any, Any], name: str = "") -> dict[str, str]:
    """LXI TXT keys → metadata. Keys without a value, undecodable or non-text values are left out."""
    metadata: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        try:
            key = raw_key.decode("utf-8") if isinstance(raw_key, bytes) else str(raw_key)
        except UnicodeDecodeError:
            log.info("discovery.mdns_bad_txt_key", service=name, key=repr(raw_key))
            continue
        target = TXT_KEYS.get(key.strip().casefold())
        if target is None:
            continue
        if raw_value is None:
            log.info("discovery.mdns_txt_without_value", service=name, key=key)
            continue
        if isinstance(raw_value, bytes):
            value = raw_value.decode("utf-8", errors="replace")
        elif isinstance(raw_value, str):
            value = raw_value
        else:
            log.info("discovery.mdns_bad_txt_value", service=name, key=key, value=repr(raw_value))
            continue
        if value.strip():
            metadata[target] = value.strip()
    return metadata


def _pick_address(addresses: Sequence[str], networks: Sequence[ipaddress.IPv4Network]) -> str | None:
    """The first IPv4 address, preferring one on a configured interface's network."""
    valid: list[ipaddress.IPv4Address] = []
    for text in addresses:
        try:
            valid.append(ipaddress.IPv4Address(text))
        except ValueError:
            continue
    for addr in valid:
        if any(addr in net for net in networks):
            return str(addr)
    return str(valid[0]) if valid else None


def record_to_resource(
    service_type: str,
    name: str,
    addresses: Sequence[str],
    port: int | None,
    properties: Mapping[Any, Any] | None,
    *,
    networks: Sequence[ipaddress.IPv4Network] = (),
    core_port_lookup: CorePortLookup | None = None,
) -> MdnsRecord | None:
    """Map one resolved DNS-SD record to a canonical resource. None (logged) when it names none."""
    service_type = service_type.lower()
    key = name.lower()
    if not isinstance(port, int) or not 0 < port < 65536:
        log.info("discovery.mdns_bad_port", service=name, port=port)
        return None
    address = _pick_address(addresses, networks)
    if address is None:
        log.info("discovery.mdns_no_ipv4_address", service=name, addresses=list(addresses))
        return None
    metadata = txt_metadata(properties or {}, name)
    try:
        if service_type == HISLIP_TYPE:
            resource = Resource(Protocol.HISLIP, address, 0, "hislip0", port)
        elif service_type == SCPI_RAW_TYPE:
            resource = Resource(Protocol.SOCKET, address, 0, "", port)
        elif service_type == VICP_TYPE:
            resource = Resource(Protocol.VICP, address, 0, "", port)
        elif service_type == LXI_TYPE:
            maker = metadata.get("manufacturer", "").casefold()
            if not maker:
                log.info("discovery.mdns_lxi_without_manufacturer", service=name)
                return None
            if not any(m in maker for m in VICP_MANUFACTURERS):
                log.debug("discovery.mdns_lxi_not_vicp", service=name, manufacturer=metadata["manufacturer"])
                return None
            resource = Resource(Protocol.VICP, address, 0, "", None)  # SRV port is the web server's
        elif service_type == VXI11_TYPE:
            core_port: int | None = None
            if port != PORTMAPPER_PORT:
                # The SRV port is the portmapper's; off 111 the resource must name the core port itself.
                core_port = core_port_lookup(address, port) if core_port_lookup else None
                if core_port is None:
                    log.info("discovery.mdns_vxi11_core_port_unknown", service=name, address=address, port=port)
                    return None
            resource = Resource(Protocol.VXI11, address, 0, "inst0", core_port)
        else:
            log.debug("discovery.mdns_unknown_type", service=name, type=service_type)
            return None
        canonical = resource.canonical
    except (InvalidResourceName, ValueError) as exc:
        log.info("discovery.mdns_bad_record", service=name, error=str(exc))
        return None
    return MdnsRecord(key, service_type, canonical, resource.protocol.value, address, metadata)


@dataclass(frozen=True)
class MdnsFound:
    record: MdnsRecord


@dataclass(frozen=True)
class MdnsGone:
    name: str
    service_type: str


MdnsUpdate = MdnsFound | MdnsGone


class _HeardListener(RecordUpdateListener):
    """Notes every live SRV or TXT record that arrives by multicast: evidence that its service answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heard: set[str] = set()

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        with self._lock:
            for update in records:
                record = update.new
                if record.type in (_TYPE_SRV, _TYPE_TXT) and record.ttl > 0:
                    self._heard.add(record.name.lower())

    def take(self) -> set[str]:
        with self._lock:
            heard, self._heard = self._heard, set()
        return heard


class MdnsBrowser:
    """Browse the LXI service types on the given IPv4 addresses; report through `sink` (called from
    zeroconf's browser thread)."""

    def __init__(
        self,
        addresses: Sequence[str],
        sink: Callable[[MdnsUpdate], None],
        *,
        networks: Sequence[ipaddress.IPv4Network] = (),
        core_port_lookup: CorePortLookup | None = None,
        resolve_timeout_s: float = 1.5,
        service_types: Sequence[str] = SERVICE_TYPES,
    ) -> None:
        if not addresses:
            raise ValueError("mDNS browsing needs at least one interface address")
        self.addresses = list(addresses)
        self._sink = sink
        self._networks = list(networks)
        self._core_port_lookup = core_port_lookup
        self._resolve_timeout_ms = int(resolve_timeout_s * 1000)
        self._service_types = list(service_types)
        self._records: dict[str, MdnsRecord] = {}
        self._lock = threading.Lock()
        # service name → (type, when to try next, current back-off): resolution to be retried
        self._pending: dict[str, tuple[str, float, float]] = {}
        self._retrying: threading.Thread | None = None
        self._heard = _HeardListener()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None

    def start(self) -> None:
        self._zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        self._zc.add_listener(self._heard, None)
        self._browser = ServiceBrowser(self._zc, self._service_types, handlers=[self._on_change])
        log.info("discovery.mdns_browsing", interfaces=self.addresses, types=self._service_types)

    def stop(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zc is not None:
            self._zc.close()
            self._zc = None

    def records(self) -> list[MdnsRecord]:
        with self._lock:
            return list(self._records.values())

    def record(self, name: str) -> MdnsRecord | None:
        with self._lock:
            return self._records.get(name.lower())

    def query(self, names: Sequence[str]) -> None:
        """Multicast a question for the SRV record of each named service (answers arrive by multicast, at
        most one a second per record: RFC 6762 §6)."""
        zc = self._zc
        if zc is None or not names:
            return
        out = DNSOutgoing(_FLAGS_QUERY, multicast=True)
        for name in names:
            out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
        zc.send(out)

    def take_heard(self) -> set[str]:
        """Service names whose SRV or TXT record arrived by multicast since the last call."""
        return self._heard.take()

    def retry_pending(self) -> None:
        """Resolve again, on a helper thread, the records whose resolution failed for a reason that may
        pass (no answer in time, VXI-11 portmapper not answering), backing off from 1 s to a minute;
        zeroconf reports a record only once."""
        zc = self._zc
        now = time.monotonic()
        with self._lock:
            due = {name: entry[0] for name, entry in self._pending.items() if entry[1] <= now}
            busy = self._retrying is not None and self._retrying.is_alive()
        if zc is None or not due or busy:
            return
        self._retrying = threading.Thread(target=self._retry, args=(zc, due), name="mdns-retry", daemon=True)
        self._retrying.start()

    def _retry(self, zc: Zeroconf, due: Mapping[str, str]) -> None:
        for name, service_type in due.items():
            self._on_change(zc, service_type, name, ServiceStateChange.Updated)

    def _defer(self, key: str, service_type: str) -> None:
        """Mark a record for retry (caller holds the lock)."""
        previous = self._pending.get(key)
        delay = min(previous[2] * 2, RETRY_MAX_S) if previous else RETRY_MIN_S
        self._pending[key] = (service_type, time.monotonic() + delay, delay)

    # --------------------------------------------------------------- browser thread
    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        try:
            self._handle_change(zeroconf, service_type, name, state_change)
        except (ZeroconfError, ValueError, UnicodeError, OSError) as exc:
            log.warning("discovery.mdns_record_failed", service=name, error=repr(exc))

    def _handle_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self._pending.pop(key, None)
                known = self._records.pop(key, None)
            if known is not None:
                self._sink(MdnsGone(key, service_type))
            return
        info = zeroconf.get_service_info(service_type, name, timeout=self._resolve_timeout_ms)
        if info is None:
            log.info("discovery.mdns_unresolved", service=name)
            with self._lock:
                if key not in self._records:
                    self._defer(key, service_type)
            return
        record = record_to_resource(
            service_type,
            name,
            info.parsed_addresses(IPVersion.V4Only),
            info.port,
            info.properties,
            networks=self._networks,
            core_port_lookup=self._core_port_lookup,
        )
        with self._lock:
            previous = self._records.get(key)
            if record is None:
                self._records.pop(key, None)
                # a VXI-11 record off port 111 needs its portmapper to answer: worth another try
                if service_type.lower() == VXI11_TYPE and info.port != PORTMAPPER_PORT:
                    self._defer(key, service_type)
            else:
                self._records[key] = record
                self._pending.pop(key, None)
        if record is not None:
            self._sink(MdnsFound(record))
        elif previous is not None:
            self._sink(MdnsGone(key, service_type))
