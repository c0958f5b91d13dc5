"""VISA resource strings for LAN instruments: parse, validate, canonicalise, match patterns.

Forms accepted (case-insensitive, as the VISA standard says; board defaults to 0):

    TCPIP[board]::host[::lan_device_name][::INSTR]      VXI-11 (device inst0 by default)
    TCPIP[board]::host,port[::lan_device_name]::INSTR   VXI-11 straight to the core port (no portmapper)
    TCPIP[board]::host::hislipN[,port]::INSTR           HiSLIP (port 4880 by default)
    TCPIP[board]::host::port::SOCKET                    raw SCPI socket
    VICP[board]::host[,port][::INSTR]                   LeCroy VICP (port 1861 by default)

Hosts may be names, IPv4 or bracketed IPv6 literals (``[::1]``), which PyVISA's parser cannot read.
Two strings that name the same instrument canonicalise to the same text, so the broker can route by it.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

from .errors import InvalidResourceName

HISLIP_DEFAULT_PORT = 4880
VICP_DEFAULT_PORT = 1861


class Protocol(enum.StrEnum):
    VXI11 = "vxi11"
    HISLIP = "hislip"
    SOCKET = "socket"
    VICP = "vicp"


@dataclass(frozen=True)
class Resource:
    """A parsed LAN resource. `port` is the transport port where the string fixes one, else None."""

    protocol: Protocol
    host: str
    board: int = 0
    device: str = ""  # VXI-11 / HiSLIP LAN device name ("inst0", "gpib0,5", "hislip0"); "" otherwise
    port: int | None = None

    @property
    def canonical(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.protocol is Protocol.SOCKET:
            return f"TCPIP{self.board}::{host}::{self.port}::SOCKET"
        if self.protocol is Protocol.VICP:
            hp = host if self.port in (None, VICP_DEFAULT_PORT) else f"{host},{self.port}"
            return f"VICP{self.board}::{hp}::INSTR"
        if self.protocol is Protocol.HISLIP:
            dev = self.device if self.port in (None, HISLIP_DEFAULT_PORT) else f"{self.device},{self.port}"
            return f"TCPIP{self.board}::{host}::{dev}::INSTR"
        hp = host if self.port is None else f"{host},{self.port}"
        return f"TCPIP{self.board}::{hp}::{self.device}::INSTR"

    @property
    def transport_port(self) -> int | None:
        """The TCP port to connect to, or None where a portmapper must be asked (plain VXI-11)."""
        if self.protocol is Protocol.HISLIP:
            return self.port or HISLIP_DEFAULT_PORT
        if self.protocol is Protocol.VICP:
            return self.port or VICP_DEFAULT_PORT
        return self.port

    def __str__(self) -> str:
        return self.canonical


_INTERFACE = re.compile(r"^(TCPIP|VICP)(\d*)$", re.IGNORECASE)


def _split_parts(text: str) -> list[str]:
    """Split on '::' except inside [...] so IPv6 literals survive."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise InvalidResourceName(f"unbalanced ']' in resource {text!r}")
        elif ch == ":" and depth == 0 and text.startswith("::", i):
            parts.append(text[start:i])
            i += 2
            start = i
            continue
        i += 1
    if depth:
        raise InvalidResourceName(f"unbalanced '[' in resource {text!r}")
    parts.append(text[start:])
    return parts


def _parse_port(text: str, what: str, resource: str) -> int:
    # [0-9] rather than isdigit(): "²" is a digit to isdigit() but int() refuses it, and "٥٠٢٥" is not a port.
    if not re.fullmatch(r"[0-9]+", text) or not 0 < int(text) < 65536:
        raise InvalidResourceName(f"{what} {text!r} in {resource!r} is not a TCP port (1-65535)")
    return int(text)


def _parse_host(text: str, resource: str) -> str:
    if not text:
        raise InvalidResourceName(f"missing host address in {resource!r}")
    if text.startswith("["):
        if not text.endswith("]"):
            raise InvalidResourceName(f"host {text!r} in {resource!r}: IPv6 literal must end with ']'")
        try:
            return ipaddress.IPv6Address(text[1:-1]).compressed
        except ValueError:
            raise InvalidResourceName(f"host {text!r} in {resource!r} is not an IPv6 address") from None
    if ":" in text:
        raise InvalidResourceName(f"host {text!r} in {resource!r}: write IPv6 literals in brackets, e.g. [::1]")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise InvalidResourceName(f"host {text!r} in {resource!r} is not a host name or address")
    return text.lower()


def _host_and_port(text: str, resource: str) -> tuple[str, int | None]:
    # "host,port" — the comma may follow a bracketed IPv6 literal.
    head, sep, tail = text.rpartition(",") if "," in text.rsplit("]", 1)[-1] else (text, "", "")
    if sep:
        return _parse_host(head, resource), _parse_port(tail, "port", resource)
    return _parse_host(text, resource), None


def parse_resource(text: str) -> Resource:
    """Parse a VISA LAN resource string; raise InvalidResourceName naming the part that is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidResourceName(f"empty resource string {text!r}")
    resource = text.strip()
    parts = _split_parts(resource)
    m = _INTERFACE.match(parts[0])
    if not m:
        raise InvalidResourceName(
            f"interface {parts[0]!r} in {resource!r} is not supported: expected TCPIP[board] or VICP[board]"
        )
    interface, board = m.group(1).upper(), int(m.group(2) or 0)
    rest = parts[1:]
    if not rest:
        raise InvalidResourceName(f"missing host address in {resource!r}")
    suffix = rest[-1].upper()
    klass = "INSTR"
    if suffix in ("INSTR", "SOCKET"):
        klass = suffix
        rest = rest[:-1]
    if not rest:  # "TCPIP::INSTR": the only part after the interface was the class
        raise InvalidResourceName(f"missing host address in {resource!r}")
    if interface == "VICP":
        if klass != "INSTR" or len(rest) != 1:
            raise InvalidResourceName(f"{resource!r}: VICP resources are VICP[board]::host[,port][::INSTR]")
        host, port = _host_and_port(rest[0], resource)
        return Resource(Protocol.VICP, host, board, "", port)
    if klass == "SOCKET":
        if len(rest) != 2:
            raise InvalidResourceName(f"{resource!r}: SOCKET resources are TCPIP[board]::host::port::SOCKET")
        return Resource(Protocol.SOCKET, _parse_host(rest[0], resource), board, "", _parse_port(rest[1], "port", resource))
    if len(rest) not in (1, 2):
        raise InvalidResourceName(f"{resource!r}: too many parts for TCPIP[board]::host[::device]::INSTR")
    host, host_port = _host_and_port(rest[0], resource)
    device = rest[1] if len(rest) == 2 else "inst0"
    if not device or not re.fullmatch(r"[A-Za-z0-9_,.]+", device):
        raise InvalidResourceName(f"LAN device name {device!r} in {resource!r} is not valid")
    if device.lower().startswith("hislip"):
        if host_port is not None:
            raise InvalidResourceName(f"{resource!r}: give the HiSLIP port as hislipN,port, not host,port")
        name, comma, port_text = device.partition(",")
        port = _parse_port(port_text, "HiSLIP port", resource) if comma else None
        return Resource(Protocol.HISLIP, host, board, name.lower(), port)
    m_dev = re.fullmatch(r"(inst|gpib|usb|hpib)(\d+)((?:,\d+){0,2})", device, re.IGNORECASE)
    device = (m_dev.group(1).lower() + m_dev.group(2) + m_dev.group(3)) if m_dev else device
    return Resource(Protocol.VXI11, host, board, device, host_port)


def canonical(text: str) -> str:
    return parse_resource(text).canonical


def _visa_pattern_to_regex(pattern: str) -> re.Pattern[str]:
    """VISA's regular-expression dialect: '?' = any char, '*' / '+' repeat the previous atom, [..] sets."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "?":
            out.append(".")
        elif ch in "*+":
            out.append(ch)
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise InvalidResourceName(f"unterminated '[' in pattern {pattern!r}")
            body = pattern[i + 1 : end]
            neg = body.startswith("^")
            body = body[1:] if neg else body
            out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]")
            i = end
        elif ch == "|":
            out.append("|")
        elif ch in "()":
            out.append(ch)
        else:
            out.append(re.escape(ch))
        i += 1
    try:
        return re.compile("(?:" + "".join(out) + r")\Z", re.IGNORECASE)
    except re.error as exc:  # "*", "(?*", "?**"...: callers handle InvalidResourceName, not re.error
        raise InvalidResourceName(f"pattern {pattern!r} is not a valid VISA expression ({exc.msg})") from None


def match_pattern(pattern: str, resource: str) -> bool:
    """True if `resource` matches a VISA list pattern such as 'TCPIP?*::INSTR' or '?*'."""
    return bool(_visa_pattern_to_regex(pattern).match(resource))
