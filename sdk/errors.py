"""VISA status codes and the exception hierarchy every visabus component raises.

The codes are VISA's own (values as in pyvisa.constants.StatusCode), so a
PyVISA user recognises them. An error crosses process boundaries as
(code, message) in a reply header; `error_from_status` rebuilds the right
subclass on the other side.
"""

from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    """The VISA completion and error codes visabus uses (signed 32-bit, as VISA defines them)."""

    VI_SUCCESS = 0
    VI_SUCCESS_TERM_CHAR = 0x3FFF0005
    VI_SUCCESS_MAX_CNT = 0x3FFF0006
    VI_SUCCESS_NESTED_EXCLUSIVE = 0x3FFF009A
    VI_SUCCESS_NESTED_SHARED = 0x3FFF0099
    VI_ERROR_SYSTEM_ERROR = -1073807360
    VI_ERROR_INV_OBJECT = -1073807346
    VI_ERROR_RSRC_LOCKED = -1073807345
    VI_ERROR_RSRC_NFOUND = -1073807343
    VI_ERROR_INV_RSRC_NAME = -1073807342
    VI_ERROR_TMO = -1073807339
    VI_ERROR_NSUP_ATTR = -1073807331
    VI_ERROR_INV_LOCK_TYPE = -1073807328
    VI_ERROR_INV_ACCESS_KEY = -1073807327
    VI_ERROR_HNDLR_NINSTALLED = -1073807320
    VI_ERROR_ABORT = -1073807312
    VI_ERROR_ALLOC = -1073807300
    VI_ERROR_IO = -1073807298
    VI_ERROR_INV_FMT = -1073807297
    VI_ERROR_NSUP_FMT = -1073807295
    VI_ERROR_NSUP_OPER = -1073807257
    VI_ERROR_RSRC_BUSY = -1073807246
    VI_ERROR_INV_PARAMETER = -1073807240
    VI_ERROR_NIMPL_OPER = -1073807231
    VI_ERROR_SESN_NLOCKED = -1073807204
    VI_ERROR_CONN_LOST = -1073807194
    VI_ERROR_MACHINE_NAVAIL = -1073807193
    VI_ERROR_NPERMISSION = -1073807192

    @property
    def is_error(self) -> bool:
        return self.value < 0


class VisaBusError(Exception):
    """Base of every visabus error. Carries a VISA status code, its name and a message.

    The message says what failed and, where it helps, what to check.
    """

    default_code: StatusCode = StatusCode.VI_ERROR_SYSTEM_ERROR

    def __init__(self, message: str, code: StatusCode | int | None = None, **details: object) -> None:
        self.code = StatusCode(code) if code is not None else self.default_code
        self.message = message
        self.details = details
        super().__init__(f"{self.code.name}: {message}")

    @property
    def name(self) -> str:
        return self.code.name

    def __reduce__(self) -> tuple[object, ...]:  # survive pickling (multiprocessing, logging handlers)
        return (error_from_status, (int(self.code), self.message, self.details))


class InvalidResourceName(VisaBusError):
    default_code = StatusCode.VI_ERROR_INV_RSRC_NAME


class ResourceNotFound(VisaBusError):
    default_code = StatusCode.VI_ERROR_RSRC_NFOUND


class VisaTimeout(VisaBusError):
    default_code = StatusCode.VI_ERROR_TMO


class ConnectionLost(VisaBusError):
    default_code = StatusCode.VI_ERROR_CONN_LOST


class ResourceLocked(VisaBusError):
    default_code = StatusCode.VI_ERROR_RSRC_LOCKED


class ResourceBusy(VisaBusError):
    default_code = StatusCode.VI_ERROR_RSRC_BUSY


class Aborted(VisaBusError):
    default_code = StatusCode.VI_ERROR_ABORT


class IOFailure(VisaBusError):
    default_code = StatusCode.VI_ERROR_IO


class NotSupported(VisaBusError):
    default_code = StatusCode.VI_ERROR_NSUP_OPER


class InvalidParameter(VisaBusError):
    default_code = StatusCode.VI_ERROR_INV_PARAMETER


class InvalidFormat(VisaBusError):
    default_code = StatusCode.VI_ERROR_INV_FMT


class SessionNotLocked(VisaBusError):
    default_code = StatusCode.VI_ERROR_SESN_NLOCKED


_CLASS_BY_CODE: dict[StatusCode, type[VisaBusError]] = {
    cls.default_code: cls
    for cls in (
        InvalidResourceName,
        ResourceNotFound,
        VisaTimeout,
        ConnectionLost,
        ResourceLocked,
        ResourceBusy,
        Aborted,
        IOFailure,
        NotSupported,
        InvalidParameter,
        InvalidFormat,
        SessionNotLocked,
    )
}


def error_from_status(code: int, message: str, details: dict[str, object] | None = None) -> VisaBusError:
    """Rebuild the matching exception for a status code received over the wire."""
    try:
        status = StatusCode(code)
    except ValueError:
        return VisaBusError(f"{message} (unknown status code {code})", StatusCode.VI_ERROR_SYSTEM_ERROR)
    cls = _CLASS_BY_CODE.get(status, VisaBusError)
    return cls(message, status, **(details or {}))
