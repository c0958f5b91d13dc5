"""visabus SDK: the wire schema, resource strings, errors and the Python client.

This package imports nothing else of visabus, so it can be vendored or
re-implemented in another language from PROTOCOL.md.
"""

from __future__ import annotations

from .errors import (
    ConnectionLost,
    InvalidResourceName,
    ResourceBusy,
    ResourceLocked,
    ResourceNotFound,
    StatusCode,
    VisaBusError,
    VisaTimeout,
)

__all__ = [
    "Client",
    "Instrument",
    "ConnectionLost",
    "InvalidResourceName",
    "ResourceBusy",
    "ResourceLocked",
    "ResourceNotFound",
    "StatusCode",
    "VisaBusError",
    "VisaTimeout",
]


def __getattr__(name: str) -> object:
    # The client pulls in pyzmq; keep `import visabus.sdk.errors` light for codecs and simulators.
    if name in ("Client", "Instrument"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
