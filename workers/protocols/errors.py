"""Protocol errors split by blame (as h11 does): our side broke the rules, or the peer did.

Both carry the VISA status the worker reports for them, so a malformed reply from an instrument
reaches the caller as a precise error rather than a crash.
"""

from __future__ import annotations

from visabus.sdk.errors import StatusCode


class ProtocolError(Exception):
    code: StatusCode = StatusCode.VI_ERROR_IO

    def __init__(self, message: str, code: StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (bad argument, oversized field)."""

    code = StatusCode.VI_ERROR_INV_PARAMETER


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed: bad header, lying length, unknown message type."""

    code = StatusCode.VI_ERROR_IO
