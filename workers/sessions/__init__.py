"""Instrument drivers behind one interface (`base.Session`), chosen by the resource's protocol."""

from __future__ import annotations

import importlib

from visabus.sdk.resources import Protocol, Resource

from .base import Session, SessionAttributes

_DRIVERS = {
    Protocol.SOCKET: ("visabus.workers.sessions.socket", "SocketSession"),
    Protocol.VXI11: ("visabus.workers.sessions.vxi11", "Vxi11Session"),
    Protocol.HISLIP: ("visabus.workers.sessions.hislip", "HislipSession"),
    Protocol.VICP: ("visabus.workers.sessions.vicp", "VicpSession"),
}


def session_for(resource: Resource, attributes: SessionAttributes | None = None) -> Session:
    """Create (not open) the driver session for `resource`."""
    module_name, class_name = _DRIVERS[resource.protocol]
    cls = getattr(importlib.import_module(module_name), class_name)
    session: Session = cls(resource, attributes)
    return session


__all__ = ["Session", "SessionAttributes", "session_for"]
