"""The simulated instrument's SCPI engine, shared by every protocol server.

`Instrument` holds the state all connections share (identity, voltage, waveform length, cached
waveform bytes). Each connection (socket, VXI-11 link, HiSLIP session, VICP connection) gets its own
`ScpiSession`: parser, output queue and status registers, as LAN instruments keep per-session I/O.

Servers drive a session with:
    write(message)            one complete program message (terminator optional)
    wait_response(timeout)    the next response message (bytes, ends with b"\\n"), honouring SLOW?
                              delays; None on timeout or when a device clear discarded it
    device_clear()            discard output, wake a waiting reader, reset the parser
    trigger(), status_byte(), serial_poll(), has_output()
SRQs are reported through the `on_srq(stb)` callback given to the session, from a timer thread.

Commands: *IDN? *RST *CLS *OPC? *OPC *ESR? *STB? *SRE *SRE? *ESE *ESE? *TRG *WAI *TST? SYST:ERR?
ECHO? <text>, VOLT <v>, VOLT?, WAV:POIN <n>, WAV:POIN?, WAV:DATA? (alias CURV?), SLOW? <ms>, SRQ <ms>,
TRG:COUN? (triggers received, by *TRG or by the protocol's trigger message).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_IDENTITY = "VISABUS,SIM-1,0001,1.0"
MAX_WAVEFORM_POINTS = 1 << 31  # 2 GiB; a simulator may be asked for big blocks but not absurd ones
STB_MAV = 0x10
STB_ESB = 0x20
STB_RQS = 0x40
STB_EAV = 0x04
ESR_OPC = 0x01
ESR_QYE = 0x04
ESR_EXE = 0x10
ESR_CME = 0x20


def waveform_bytes(n: int) -> bytes:
    """The deterministic test pattern: byte i = i mod 256."""
    whole, part = divmod(n, 256)
    return bytes(range(256)) * whole + bytes(range(part))


def ieee_block(data: bytes) -> bytes:
    """Wrap `data` in an IEEE 488.2 definite-length block header."""
    length = str(len(data)).encode()
    return b"#" + str(len(length)).encode() + length + data


class _Terminated(bytes):
    """A response that already ends with its LF terminator (the cached waveform block)."""


@dataclass
class Instrument:
    """State shared by every connection to one simulated instrument."""

    identity: str = DEFAULT_IDENTITY
    voltage: float = 0.0
    waveform_points: int = 1000
    triggers: int = 0
    _waveform_cache: dict[int, _Terminated] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def waveform_block(self) -> _Terminated:
        """WAV:DATA? response body (block + LF); cached because 64 MiB blocks are asked for repeatedly."""
        n = self.waveform_points
        with self._lock:
            block = self._waveform_cache.get(n)
            if block is None:
                self._waveform_cache.clear()
                block = _Terminated(ieee_block(waveform_bytes(n)) + b"\n")
                self._waveform_cache[n] = block
        return block

    def reset(self) -> None:
        self.voltage = 0.0
        self.waveform_points = 1000


@dataclass
class _Pending:
    ready_at: float
    data: bytes
    tag: Any = None  # what the server passed to write(): e.g. the VICP sequence number of the command


class ScpiSession:
    """One connection's view of the instrument: parser, output queue, status registers."""

    def __init__(self, instrument: Instrument, on_srq: Callable[[int], None] | None = None) -> None:
        self.instrument = instrument
        self.on_srq = on_srq
        self._cond = threading.Condition()
        self._output: collections.deque[_Pending] = collections.deque()
        self._errors: collections.deque[tuple[int, str]] = collections.deque(maxlen=32)
        self._esr = 0
        self._ese = 0
        self._sre = 0
        self._rqs = False
        self._clear_generation = 0
        self._srq_timers: list[threading.Timer] = []

    # ---------------------------------------------------------------- server-facing API
    def write(self, message: bytes | bytearray | memoryview, tag: Any = None) -> None:
        """Execute one program message; its response (if any) carries `tag` (see wait_tagged)."""
        text = bytes(message).decode("latin-1").strip().rstrip("\r\n")
        if not text:
            return
        replies: list[bytes] = []
        delay = 0.0
        for unit in _split_units(text):
            result = self._execute(unit)
            if result is None:
                continue
            reply, unit_delay = result
            replies.append(reply)
            delay = max(delay, unit_delay)
        if len(replies) == 1 and isinstance(replies[0], _Terminated):
            self._queue(replies[0], delay, tag)  # a cached block: no 64 MiB copy per query
        elif replies:
            self._queue(b";".join(r[:-1] if isinstance(r, _Terminated) else r for r in replies) + b"\n", delay, tag)

    def wait_response(self, timeout: float | None) -> bytes | None:
        """Block until the next response is ready; None on timeout or if a device clear removed it."""
        item = self.wait_tagged(timeout)
        return None if item is None else item[0]

    def wait_tagged(self, timeout: float | None) -> tuple[bytes, Any] | None:
        """Like wait_response, with the tag given to the write() that produced the response."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            generation = self._clear_generation
            while True:
                if self._clear_generation != generation:
                    return None
                now = time.monotonic()
                if self._output and self._output[0].ready_at <= now:
                    pending = self._output.popleft()
                    return pending.data, pending.tag
                wake = self._output[0].ready_at if self._output else None
                if deadline is not None:
                    wake = deadline if wake is None else min(wake, deadline)
                    if now >= deadline:
                        return None
                self._cond.wait(None if wake is None else max(0.0, wake - now))

    def has_output(self) -> bool:
        with self._cond:
            return bool(self._output)

    def device_clear(self) -> None:
        with self._cond:
            self._output.clear()
            self._clear_generation += 1
            self._cond.notify_all()

    def trigger(self) -> None:
        self.instrument.triggers += 1

    def status_byte(self) -> int:
        """*STB? value: MAV, ESB, EAV and the summary bit (MSS) computed from the registers."""
        stb = 0
        if self.has_output():
            stb |= STB_MAV
        if self._errors:
            stb |= STB_EAV
        if self._esr & self._ese:
            stb |= STB_ESB
        if self._rqs or (stb & self._sre & ~STB_RQS):
            stb |= STB_RQS
        return stb

    def serial_poll(self) -> int:
        """Status byte as a serial poll / readstb sees it: RQS in bit 6, cleared by the poll."""
        stb = self.status_byte()
        self._rqs = False
        return stb

    def close(self) -> None:
        for timer in self._srq_timers:
            timer.cancel()
        self.device_clear()

    # ---------------------------------------------------------------- internals
    def _queue(self, data: bytes, delay: float, tag: Any = None) -> None:
        with self._cond:
            self._output.append(_Pending(time.monotonic() + delay, data, tag))
            self._cond.notify_all()

    def _error(self, code: int, text: str) -> None:
        self._errors.append((code, text))
        self._esr |= ESR_CME if -199 <= code <= -100 else ESR_EXE

    def _request_service(self) -> None:
        self._rqs = True
        if self.on_srq is not None:
            self.on_srq(self.status_byte())

    def _execute(self, unit: str) -> tuple[bytes, float] | None:
        header, _, arg = unit.partition(" ")
        header_u = header.upper().lstrip(":")
        arg = arg.strip()
        handler = _COMMANDS.get(_normalise(header_u))
        if handler is None:
            self._error(-113, f'Undefined header;"{header}"')
            return None
        try:
            return handler(self, arg)
        except (ValueError, OverflowError):
            self._error(-224, f'Illegal parameter value;"{unit}"')
            return None


def _split_units(text: str) -> list[str]:
    """Split a program message on ';' outside quoted strings."""
    units, current, quote = [], [], ""
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch == ";":
            units.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    units.append("".join(current).strip())
    return [u for u in units if u]


# SCPI long/short forms accepted for each command, normalised to one key.
_ALIASES = {
    "SYSTEM:ERROR?": "SYST:ERR?", "SYST:ERROR?": "SYST:ERR?", "SYSTEM:ERR?": "SYST:ERR?",
    "SYST:ERR:NEXT?": "SYST:ERR?", "VOLTAGE": "VOLT", "VOLTAGE?": "VOLT?",
    "WAVEFORM:POINTS": "WAV:POIN", "WAVEFORM:POINTS?": "WAV:POIN?", "WAV:POINTS": "WAV:POIN",
    "WAV:POINTS?": "WAV:POIN?", "WAVEFORM:DATA?": "WAV:DATA?", "CURVE?": "CURV?",
    "TRIG:COUN?": "TRG:COUN?", "TRIGGER:COUNT?": "TRG:COUN?",
}


def _normalise(header: str) -> str:
    return _ALIASES.get(header, header)


def _reply(text: str) -> tuple[bytes, float]:
    return text.encode("latin-1"), 0.0


def _cmd_idn(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(s.instrument.identity)


def _cmd_rst(s: ScpiSession, arg: str) -> None:
    s.instrument.reset()
    return None


def _cmd_cls(s: ScpiSession, arg: str) -> None:
    s._errors.clear()
    s._esr = 0
    s._rqs = False
    return None


def _cmd_opc_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply("1")


def _cmd_opc(s: ScpiSession, arg: str) -> None:
    s._esr |= ESR_OPC
    return None


def _cmd_esr_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    value, s._esr = s._esr, 0
    return _reply(str(value))


def _cmd_stb_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(str(s.status_byte()))


def _int_arg(arg: str, low: int, high: int) -> int:
    value = int(float(arg))
    if not low <= value <= high:
        raise ValueError(arg)
    return value


def _cmd_sre(s: ScpiSession, arg: str) -> None:
    s._sre = _int_arg(arg, 0, 255) & ~STB_RQS
    return None


def _cmd_sre_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(str(s._sre))


def _cmd_ese(s: ScpiSession, arg: str) -> None:
    s._ese = _int_arg(arg, 0, 255)
    return None


def _cmd_ese_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(str(s._ese))


def _cmd_trg(s: ScpiSession, arg: str) -> None:
    s.trigger()
    return None


def _cmd_trg_count_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(str(s.instrument.triggers))  # *TRG and protocol-level triggers seen so far


def _cmd_nop(s: ScpiSession, arg: str) -> None:
    return None


def _cmd_tst_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply("0")


def _cmd_err_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    if not s._errors:
        return _reply('0,"No error"')
    code, text = s._errors.popleft()
    # IEEE 488.2 string response data: a double quote inside the string is doubled.
    return _reply(f'{code},"{text.replace(chr(34), chr(34) * 2)}"')


def _cmd_echo_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(arg)


def _cmd_volt(s: ScpiSession, arg: str) -> None:
    s.instrument.voltage = float(arg)
    return None


def _cmd_volt_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(repr(float(s.instrument.voltage)))


def _cmd_wav_poin(s: ScpiSession, arg: str) -> None:
    s.instrument.waveform_points = _int_arg(arg, 0, MAX_WAVEFORM_POINTS)
    return None


def _cmd_wav_poin_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return _reply(str(s.instrument.waveform_points))


def _cmd_wav_data_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return s.instrument.waveform_block(), 0.0


def _cmd_slow_q(s: ScpiSession, arg: str) -> tuple[bytes, float]:
    return b"1", _int_arg(arg or "0", 0, 3_600_000) / 1000.0


def _cmd_srq(s: ScpiSession, arg: str) -> None:
    delay = _int_arg(arg or "0", 0, 3_600_000) / 1000.0
    timer = threading.Timer(delay, s._request_service)
    timer.daemon = True
    s._srq_timers = [t for t in s._srq_timers if t.is_alive()] + [timer]
    timer.start()
    return None


_COMMANDS: dict[str, Callable[[ScpiSession, str], tuple[bytes, float] | None]] = {
    "*IDN?": _cmd_idn, "*RST": _cmd_rst, "*CLS": _cmd_cls, "*OPC?": _cmd_opc_q, "*OPC": _cmd_opc,
    "*ESR?": _cmd_esr_q, "*STB?": _cmd_stb_q, "*SRE": _cmd_sre, "*SRE?": _cmd_sre_q, "*ESE": _cmd_ese,
    "*ESE?": _cmd_ese_q, "*TRG": _cmd_trg, "*WAI": _cmd_nop, "*TST?": _cmd_tst_q, "SYST:ERR?": _cmd_err_q,
    "ECHO?": _cmd_echo_q, "VOLT": _cmd_volt, "VOLT?": _cmd_volt_q, "WAV:POIN": _cmd_wav_poin,
    "WAV:POIN?": _cmd_wav_poin_q, "WAV:DATA?": _cmd_wav_data_q, "CURV?": _cmd_wav_data_q,
    "SLOW?": _cmd_slow_q, "SRQ": _cmd_srq, "TRG:COUN?": _cmd_trg_count_q,
}
