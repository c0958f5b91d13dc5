"""Advertise a simulated instrument's servers with mDNS / DNS-SD, as an LXI instrument does.

One DNS-SD service per protocol served, all carrying LXI-style TXT records (txtvers=1, Manufacturer,
Model, SerialNumber, FirmwareVersion, parsed from the "MFR,MODEL,SERIAL,FW" identity):

    vxi11   _vxi-11._tcp    SRV port = the portmapper's port (111 on a real instrument)
    hislip  _hislip._tcp    SRV port = the HiSLIP port
    socket  _scpi-raw._tcp  SRV port = the raw SCPI port
    vicp    _lxi._tcp       when the maker is LeCroy/Teledyne and VICP is on its standard port 1861 (the
                            SRV port of an LXI record is the web server's, 80, as on a real scope);
            _vicp._tcp      otherwise, with the VICP port

zeroconf is bound to the interface of `address` only, so nothing is announced elsewhere. `stop()` sends
the mDNS goodbye (TTL 0) for every record, which browsers take as an immediate disappearance.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from typing import Self

import structlog
from zeroconf import IPVersion, ServiceInfo, Zeroconf

log = structlog.get_logger(__name__)

VICP_DEFAULT_PORT = 1861
LXI_WEB_PORT = 80
REGISTER_TIMEOUT_S = 10.0
_VICP_MAKERS = ("lecroy", "teledyne")
_SERVICE_TYPES = {
    "vxi11": "_vxi-11._tcp.local.",
    "hislip": "_hislip._tcp.local.",
    "socket": "_scpi-raw._tcp.local.",
    "vicp": "_vicp._tcp.local.",
}
_LXI_TYPE = "_lxi._tcp.local."
_MAX_LABEL = 63  # DNS label limit for the instance name


def parse_identity(identity: str) -> dict[str, str]:
    """'MFR,MODEL,SERIAL,FW' → LXI TXT keys; blank or missing fields are left out."""
    keys = ("Manufacturer", "Model", "SerialNumber", "FirmwareVersion")
    parts = [p.strip() for p in identity.split(",")]
    return {key: value for key, value in zip(keys, parts, strict=False) if value}  # fewer fields than keys is fine


def _label(text: str) -> str:
    data = text.encode("utf-8")[:_MAX_LABEL]
    return data.decode("utf-8", errors="ignore").strip()


class Advertiser:
    """Registers one mDNS service per protocol in `services` (protocol name → TCP port) on `address`."""

    def __init__(self, address: str, identity: str, services: Mapping[str, int]) -> None:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"advertise address {address!r} is not an IPv4 address") from None
        for protocol, port in services.items():
            if protocol not in _SERVICE_TYPES:
                raise ValueError(f"cannot advertise protocol {protocol!r}: expected one of {sorted(_SERVICE_TYPES)}")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"port {port!r} for {protocol} is not a TCP port (1-65535)")
        if not services:
            raise ValueError("nothing to advertise: no services given")
        self.address = address
        self.identity = identity
        self.services = dict(services)
        self.txt = {"txtvers": "1", **parse_identity(identity)}
        self._zc: Zeroconf | None = None
        self.infos: list[ServiceInfo] = self._service_infos()

    def _service_infos(self) -> list[ServiceInfo]:
        maker = self.txt.get("Manufacturer", "")
        title = " ".join(
            v for v in (maker, self.txt.get("Model", ""), self.txt.get("SerialNumber", "")) if v
        ) or "visabus simulator"
        first_port = min(self.services.values())
        server = f"visabus-sim-{self.address.replace('.', '-')}-{first_port}.local."
        instance = _label(f"{title} ({self.address}:{first_port})")
        infos: list[ServiceInfo] = []
        for protocol, port in sorted(self.services.items()):
            service_type = _SERVICE_TYPES[protocol]
            if protocol == "vicp" and port == VICP_DEFAULT_PORT and any(m in maker.casefold() for m in _VICP_MAKERS):
                service_type, port = _LXI_TYPE, LXI_WEB_PORT
            infos.append(
                ServiceInfo(
                    service_type,
                    f"{instance}.{service_type}",
                    port=port,
                    properties=self.txt,
                    server=server,
                    addresses=[socket.inet_aton(self.address)],
                )
            )
        return infos

    def start(self) -> Self:
        """Register every service (probing for name conflicts, renaming on one); returns once announced."""
        zc = Zeroconf(interfaces=[self.address], ip_version=IPVersion.V4Only)
        self._zc = zc
        if zc.loop is None:
            raise RuntimeError("zeroconf did not start its event loop")
        future = asyncio.run_coroutine_threadsafe(self._register_all(zc), zc.loop)
        try:
            future.result(timeout=REGISTER_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        log.info("sim.advertised", address=self.address, services=[i.name for i in self.infos])
        return self

    async def _register_all(self, zc: Zeroconf) -> None:
        # Concurrently: each registration probes for ~1 s, and a simulator serves up to four protocols.
        announcements = await asyncio.gather(
            *(zc.async_register_service(info, allow_name_change=True) for info in self.infos)
        )
        await asyncio.gather(*announcements)

    def stop(self) -> None:
        """Withdraw every service with an mDNS goodbye, then release the sockets."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        zc.unregister_all_services()
        zc.close()
        log.info("sim.advertisement_withdrawn", address=self.address)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
