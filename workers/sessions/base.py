"""The interface every instrument driver (SOCKET, VXI-11, HiSLIP, VICP) implements for the worker.

Threading contract: the worker calls every method from its single executor thread, in order, EXCEPT
`clear()` and `abort()`, which the worker's control thread may call while the executor is blocked in
`read_into` / `write`. A blocked call interrupted that way raises `Aborted`. Drivers raise only
`visabus.sdk.errors.VisaBusError` subclasses (VisaTimeout, ConnectionLost, ResourceNotFound, IOFailure,
NotSupported, ResourceLocked, ...), never raw socket errors.

Timeouts are in seconds (float); None means wait forever.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

from visabus.sdk.errors import NotSupported, StatusCode
from visabus.sdk.resources import Resource

SrqHandler = Callable[[int], None]  # called with the status byte when the instrument requests service


@dataclass
class SessionAttributes:
    """Per-session settings a client may get/set (VISA attribute names in comments)."""

    timeout: float | None = 2.0          # VI_ATTR_TMO_VALUE (s)
    term_char: int = 0x0A                # VI_ATTR_TERMCHAR
    term_char_enabled: bool = False      # VI_ATTR_TERMCHAR_EN
    send_end: bool = True                # VI_ATTR_SEND_END_EN
    keepalive: bool = False              # VI_ATTR_TCPIP_KEEPALIVE
    nodelay: bool = True                 # VI_ATTR_TCPIP_NODELAY
    max_message_kb: int = 1024           # VI_ATTR_TCPIP_HISLIP_MAX_MESSAGE_KB
    extra: dict[str, object] = field(default_factory=dict)  # driver-specific


class Session(abc.ABC):
    """One open connection to one instrument."""

    def __init__(self, resource: Resource, attributes: SessionAttributes | None = None) -> None:
        self.resource = resource
        self.attributes = attributes or SessionAttributes()
        self.srq_handler: SrqHandler | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    @abc.abstractmethod
    def open(self, timeout: float | None) -> None:
        """Connect. Refused/unreachable -> ResourceNotFound; slow -> VisaTimeout."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; never raises."""

    def begin(self) -> None:  # noqa: B027 - an optional hook, deliberately empty by default
        """Called by the worker at the start of each operation (a driver may bind it to its connection)."""

    # --- message-based I/O --------------------------------------------------------------------
    @abc.abstractmethod
    def write(self, data: bytes | memoryview, timeout: float | None) -> int:
        """Send one message (with END where the protocol has it). Returns bytes written."""

    @abc.abstractmethod
    def read_into(self, buffer: memoryview, timeout: float | None, term_char: int | None) -> tuple[int, bool]:
        """Read up to len(buffer) bytes into `buffer`.

        Returns (nbytes, end): `end` is True when the message ended (END/EOI, or `term_char` seen when it
        is not None). Returns as soon as some data is available and either the buffer is full or the
        message ended; a protocol without END (raw socket) may return (n, False) with n < len(buffer).
        """

    # --- control ------------------------------------------------------------------------------
    def clear(self) -> None:
        """Device clear. Safe to call from another thread while read_into/write is blocked."""
        raise NotSupported(f"{self.resource}: device clear is not supported by this protocol")

    def abort(self) -> None:
        """Unblock a read/write in progress (it raises Aborted) without a full device clear."""
        self.clear()

    def read_stb(self) -> int:
        raise NotSupported(f"{self.resource}: read_stb (serial poll) is not supported by this protocol")

    def trigger(self) -> None:
        raise NotSupported(f"{self.resource}: trigger is not supported by this protocol")

    def lock(self, exclusive: bool, timeout: float | None) -> None:
        """Take the instrument's own lock (VXI-11 device_lock, HiSLIP AsyncLock)."""
        raise NotSupported(f"{self.resource}: instrument-level locking is not supported by this protocol")

    def unlock(self) -> None:
        raise NotSupported(f"{self.resource}: instrument-level locking is not supported by this protocol")

    def remote(self) -> None:
        raise NotSupported(f"{self.resource}: remote/local control is not supported by this protocol")

    def local(self) -> None:
        raise NotSupported(f"{self.resource}: remote/local control is not supported by this protocol")

    def enable_srq(self, handler: SrqHandler | None) -> None:
        """Deliver service requests to `handler` (None disables). Default: not supported."""
        if handler is not None:
            raise NotSupported(f"{self.resource}: service requests are not supported by this protocol")

    def set_attribute(self, name: str, value: object) -> None:
        """Apply a changed attribute to the live connection (keepalive, nodelay...). Default: store only.

        Driver-specific settings are named `<protocol>_<setting>` (e.g. vicp_serial_poll) and kept in `extra`.
        """
        if hasattr(self.attributes, name) and name != "extra":
            setattr(self.attributes, name, value)
        elif name.startswith(f"{self.resource.protocol.value}_") or name in self.attributes.extra:
            self.attributes.extra[name] = value
        else:
            raise NotSupported(f"{self.resource}: unknown attribute {name!r}", StatusCode.VI_ERROR_NSUP_ATTR)

    @property
    def connected(self) -> bool:
        return True
