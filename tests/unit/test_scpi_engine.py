"""The simulator's SCPI engine (sim/scpi.py), driven directly: no sockets, no servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from visabus.sim import scpi
from visabus.sim.scpi import STB_EAV, STB_ESB, STB_MAV, STB_RQS, Instrument, ScpiSession

NO_ERROR = b'0,"No error"\n'


@pytest.fixture
def instrument() -> Instrument:
    return Instrument()


@pytest.fixture
def session(instrument: Instrument) -> Iterator[ScpiSession]:
    s = ScpiSession(instrument)
    yield s
    s.close()


def ask(s: ScpiSession, message: str | bytes) -> bytes | None:
    s.write(message.encode() if isinstance(message, str) else message)
    return s.wait_response(1.0)


def errors(s: ScpiSession) -> list[bytes]:
    """Drain the error queue."""
    out = []
    while (reply := ask(s, "SYST:ERR?")) != NO_ERROR:
        assert reply is not None
        out.append(reply)
    return out


# ------------------------------------------------------------------------------------ every command
# (setup program messages, query, expected response)
COMMANDS = [
    ([], "*IDN?", b"VISABUS,SIM-1,0001,1.0\n"),
    ([], "*idn?", b"VISABUS,SIM-1,0001,1.0\n"),             # headers are case-insensitive
    ([], ":*IDN?", b"VISABUS,SIM-1,0001,1.0\n"),
    ([], "*OPC?", b"1\n"),
    ([], "*TST?", b"0\n"),
    ([], "*ESR?", b"0\n"),
    (["*OPC"], "*ESR?", b"1\n"),
    (["*OPC", "*ESR?"], "*ESR?", b"0\n"),                    # reading ESR clears it
    ([], "*STB?", b"0\n"),
    ([], "*SRE?", b"0\n"),
    (["*SRE 48"], "*SRE?", b"48\n"),
    (["*SRE 255"], "*SRE?", b"191\n"),                      # bit 6 (RQS) cannot be enabled
    (["*ESE 36"], "*ESE?", b"36\n"),
    (["*ESE 255"], "*ESE?", b"255\n"),
    (["*WAI"], "*OPC?", b"1\n"),
    ([], "SYST:ERR?", NO_ERROR),
    ([], "SYSTEM:ERROR?", NO_ERROR),
    ([], "SYST:ERR:NEXT?", NO_ERROR),
    ([], "ECHO? hello world", b"hello world\n"),
    ([], 'ECHO? "a;b"', b'"a;b"\n'),                        # ';' inside quotes does not split
    ([], "ECHO?", b"\n"),
    ([], "VOLT?", b"0.0\n"),
    (["VOLT 1.5"], "VOLT?", b"1.5\n"),
    (["VOLTAGE -2.25"], "VOLTAGE?", b"-2.25\n"),
    (["volt 3e-3"], "volt?", b"0.003\n"),
    ([], "WAV:POIN?", b"1000\n"),
    (["WAV:POIN 2048"], "WAV:POIN?", b"2048\n"),
    (["WAVEFORM:POINTS 1e3"], "WAVEFORM:POINTS?", b"1000\n"),
    (["WAV:POINTS 7"], "WAV:POINTS?", b"7\n"),
    (["WAV:POIN 3"], "WAV:DATA?", b"#13\x00\x01\x02\n"),
    (["WAV:POIN 3"], "WAVEFORM:DATA?", b"#13\x00\x01\x02\n"),
    (["WAV:POIN 3"], "CURV?", b"#13\x00\x01\x02\n"),
    (["WAV:POIN 3"], "CURVE?", b"#13\x00\x01\x02\n"),
    (["WAV:POIN 0"], "WAV:DATA?", b"#10\n"),
    ([], "SLOW?", b"1\n"),
    ([], "SLOW? 0", b"1\n"),
    (["VOLT 4", "WAV:POIN 9", "*RST"], "VOLT?;WAV:POIN?", b"0.0;1000\n"),
]


@pytest.mark.parametrize(("setup", "query", "expected"), COMMANDS, ids=[f"{' '.join(s)}|{q}" for s, q, _ in COMMANDS])
def test_command(session: ScpiSession, setup: list[str], query: str, expected: bytes) -> None:
    for message in setup:
        session.write(message.encode())
        if message.split()[0].endswith("?"):
            assert session.wait_response(1.0) is not None
    assert ask(session, query) == expected
    assert errors(session) == []
    assert not session.has_output()


@pytest.mark.parametrize("terminator", [b"", b"\n", b"\r\n", b"  \r\n"])
def test_terminator_is_optional(session: ScpiSession, terminator: bytes) -> None:
    assert ask(session, b"*IDN?" + terminator) == b"VISABUS,SIM-1,0001,1.0\n"


def test_empty_message_produces_nothing(session: ScpiSession) -> None:
    session.write(b"\r\n")
    session.write(b";;")
    assert not session.has_output()
    assert errors(session) == []


def test_trigger(session: ScpiSession, instrument: Instrument) -> None:
    session.write(b"*TRG")
    session.trigger()  # GET / device_trigger from a protocol server
    assert instrument.triggers == 2
    assert not session.has_output()


def test_cls_clears_errors_and_esr(session: ScpiSession) -> None:
    session.write(b"NOPE;*OPC")
    session.write(b"*CLS")
    assert ask(session, "*ESR?") == b"0\n"
    assert errors(session) == []


def test_instrument_state_is_shared_but_io_is_per_session(instrument: Instrument) -> None:
    a, b = ScpiSession(instrument), ScpiSession(instrument)
    a.write(b"VOLT 7.5")
    a.write(b"*IDN?")
    b.write(b"BOGUS")
    assert ask(b, "VOLT?") == b"7.5\n"        # shared instrument state
    assert b.has_output() is False           # a's response stays in a's queue
    assert a.wait_response(1.0) == b"VISABUS,SIM-1,0001,1.0\n"
    assert errors(a) == []                   # b's error is b's
    assert len(errors(b)) == 1


def test_custom_identity() -> None:
    s = ScpiSession(Instrument(identity="ACME,DMM-9,42,2.1"))
    assert ask(s, "*IDN?") == b"ACME,DMM-9,42,2.1\n"


# ------------------------------------------------------------------------------------ error queue
def test_unknown_header_queues_minus_113(session: ScpiSession) -> None:
    session.write(b"FROB 3")
    assert not session.has_output()
    reply = ask(session, "SYST:ERR?")
    assert reply is not None and reply.startswith(b"-113,")
    assert b"FROB" in reply
    assert ask(session, "SYST:ERR?") == NO_ERROR
    assert int(ask(session, "*ESR?")) & scpi.ESR_CME  # type: ignore[arg-type]


def test_syst_err_reply_is_a_valid_scpi_string(session: ScpiSession) -> None:
    # <code>,"<text>": a double quote inside <text> must be doubled (IEEE 488.2 string response data).
    session.write(b"FROB")
    assert ask(session, "SYST:ERR?") == b'-113,"Undefined header;""FROB"""\n'


def test_error_queue_is_fifo(session: ScpiSession) -> None:
    session.write(b"AAA")
    session.write(b"VOLT banana")
    session.write(b"BBB")
    replies = errors(session)
    assert [r.split(b",")[0] for r in replies] == [b"-113", b"-224", b"-113"]
    assert b"AAA" in replies[0] and b"banana" in replies[1] and b"BBB" in replies[2]


@pytest.mark.parametrize(
    "command",
    ["VOLT banana", "VOLT", "WAV:POIN -1", "WAV:POIN 2147483649", "WAV:POIN abc", "WAV:POIN inf", "WAV:POIN nan",
     "*SRE 256", "*ESE -1", "SLOW? -5", "SLOW? 3600001", "SRQ x"],
)
def test_illegal_parameter_queues_minus_224(session: ScpiSession, command: str) -> None:
    points = session.instrument.waveform_points
    session.write(command.encode())
    replies = errors(session)
    assert len(replies) == 1 and replies[0].startswith(b"-224,")
    assert int(ask(session, "*ESR?")) & scpi.ESR_EXE  # type: ignore[arg-type]
    assert session.instrument.waveform_points == points


def test_error_sets_eav_in_status_byte(session: ScpiSession) -> None:
    assert session.status_byte() & STB_EAV == 0
    session.write(b"NOPE")
    assert session.status_byte() & STB_EAV
    errors(session)
    assert session.status_byte() & STB_EAV == 0


# ------------------------------------------------------------------------------------ units
def test_units_answer_in_one_message(session: ScpiSession) -> None:
    assert ask(session, "VOLT 2;VOLT?;*OPC?;ECHO? x") == b"2.0;1;x\n"
    assert not session.has_output()


def test_unit_errors_do_not_stop_the_message(session: ScpiSession) -> None:
    assert ask(session, "*IDN?;BOGUS;*OPC?") == b"VISABUS,SIM-1,0001,1.0;1\n"
    assert len(errors(session)) == 1


def test_units_of_commands_only_produce_no_response(session: ScpiSession) -> None:
    session.write(b"VOLT 1; WAV:POIN 5 ;*CLS")
    assert not session.has_output()
    assert session.instrument.voltage == 1.0 and session.instrument.waveform_points == 5


def test_block_in_a_unit_list(session: ScpiSession) -> None:
    assert ask(session, "WAV:POIN 4;WAV:DATA?;*OPC?") == b"#14\x00\x01\x02\x03;1\n"


def test_each_write_queues_its_own_response(session: ScpiSession) -> None:
    session.write(b"ECHO? one")
    session.write(b"ECHO? two")
    assert session.wait_response(1.0) == b"one\n"
    assert session.wait_response(1.0) == b"two\n"
    assert session.wait_response(0.0) is None


# ------------------------------------------------------------------------------------ waveform
@pytest.mark.parametrize("points", [1, 255, 256, 257, 1000, 70_000])
def test_waveform_block_format_and_pattern(session: ScpiSession, points: int) -> None:
    session.write(f"WAV:POIN {points}".encode())
    reply = ask(session, "WAV:DATA?")
    assert reply is not None
    digits = str(points).encode()
    header = b"#" + str(len(digits)).encode() + digits
    assert reply.startswith(header) and reply.endswith(b"\n")
    data = reply[len(header):-1]
    assert len(data) == points
    assert all(byte == i % 256 for i, byte in enumerate(data))


def test_waveform_helpers() -> None:
    assert scpi.waveform_bytes(0) == b""
    assert scpi.waveform_bytes(258) == bytes(range(256)) + b"\x00\x01"
    assert scpi.ieee_block(b"") == b"#10"
    assert scpi.ieee_block(b"hello") == b"#15hello"
    assert scpi.ieee_block(bytes(12345)).startswith(b"#512345")


def test_waveform_cache_follows_points(instrument: Instrument) -> None:
    instrument.waveform_points = 10
    first = instrument.waveform_block()
    assert instrument.waveform_block() is first  # cached
    instrument.waveform_points = 11
    assert instrument.waveform_block() == b"#211" + scpi.waveform_bytes(11) + b"\n"


# ------------------------------------------------------------------------------------ SLOW?
def test_slow_query_is_not_ready_before_its_delay(session: ScpiSession) -> None:
    start = time.monotonic()
    session.write(b"SLOW? 1000")
    assert session.wait_response(0.05) is None     # ~50 ms into a 1 s operation: not ready
    reply = session.wait_response(10.0)            # generous: it is ready long before this
    elapsed = time.monotonic() - start
    assert reply == b"1\n"
    assert elapsed >= 1.0                          # never early (a lower bound, not a tight timing)


def test_slow_response_blocks_the_ones_behind_it(session: ScpiSession) -> None:
    session.write(b"SLOW? 500")
    session.write(b"*OPC?")
    assert session.wait_response(0.0) is None      # responses come in order
    assert session.wait_response(10.0) == b"1\n"
    assert session.wait_response(0.0) == b"1\n"


def test_slow_unit_delays_the_whole_message(session: ScpiSession) -> None:
    session.write(b"ECHO? a;SLOW? 500;ECHO? b")
    assert session.wait_response(0.02) is None
    assert session.wait_response(10.0) == b"a;1;b\n"


def test_wait_response_zero_timeout(session: ScpiSession) -> None:
    assert session.wait_response(0.0) is None
    session.write(b"*OPC?")
    assert session.wait_response(0.0) == b"1\n"


# ------------------------------------------------------------------------------------ device clear
class _SignallingCondition(threading.Condition):
    """A Condition that says when someone waits on it, so a test can act on a reader known to be blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


@pytest.mark.parametrize("pending", [b"", b"SLOW? 60000"], ids=["empty-queue", "slow-pending"])
def test_device_clear_wakes_a_waiting_reader(instrument: Instrument, pending: bytes) -> None:
    s = ScpiSession(instrument)
    cond = s._cond = _SignallingCondition()
    if pending:
        s.write(pending)
    result: list[bytes | None] = []
    done = threading.Event()

    def reader() -> None:
        result.append(s.wait_response(30.0))
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert cond.waiting.wait(5.0)      # the reader is inside wait() and has released the lock
    s.device_clear()                   # so this runs while it is blocked
    assert done.wait(5.0), "device_clear did not wake the reader"
    thread.join(5.0)
    assert result == [None]
    assert not s.has_output()
    assert ask(s, "*OPC?") == b"1\n"  # the session works normally afterwards


def test_device_clear_discards_output(session: ScpiSession) -> None:
    session.write(b"*IDN?")
    session.write(b"SLOW? 60000")
    assert session.has_output()
    session.device_clear()
    assert not session.has_output()
    assert session.status_byte() & STB_MAV == 0
    assert session.wait_response(0.0) is None


# ------------------------------------------------------------------------------------ status byte
def test_mav_follows_the_output_queue(session: ScpiSession) -> None:
    assert session.status_byte() & STB_MAV == 0
    session.write(b"*IDN?")
    assert session.status_byte() & STB_MAV
    assert session.serial_poll() & STB_MAV       # a poll does not consume the response
    session.wait_response(1.0)
    assert session.status_byte() & STB_MAV == 0


def test_mav_is_set_while_a_slow_response_is_queued(session: ScpiSession) -> None:
    # Servers and drivers rely on this: readstb shows MAV as soon as a response is queued.
    session.write(b"SLOW? 60000")
    assert session.status_byte() & STB_MAV


def test_stb_query_reports_queue_state_before_its_own_answer(session: ScpiSession) -> None:
    session.write(b"*OPC?")
    session.write(b"*STB?")
    assert session.wait_response(1.0) == b"1\n"
    assert session.wait_response(1.0) == b"16\n"  # MAV: the *OPC? answer was queued when *STB? ran
    assert ask(session, "*STB?") == b"0\n"        # nothing was queued this time


def test_esb_summary(session: ScpiSession) -> None:
    session.write(b"*ESE 32")                    # CME
    session.write(b"BOGUS")
    assert session.status_byte() & STB_ESB
    session.write(b"*ESR?")
    session.wait_response(1.0)
    assert session.status_byte() & STB_ESB == 0


def test_mss_summary_from_service_request_enable(session: ScpiSession) -> None:
    session.write(b"*SRE 16")                    # MAV
    assert session.status_byte() & STB_RQS == 0
    session.write(b"*IDN?")
    assert session.status_byte() & (STB_MAV | STB_RQS) == STB_MAV | STB_RQS
    session.wait_response(1.0)
    assert session.status_byte() & (STB_MAV | STB_RQS) == 0


def test_stb_query_value(session: ScpiSession) -> None:
    session.write(b"*ESE 32;*SRE 32;BOGUS")     # CME -> ESB -> MSS; the error -> EAV
    assert ask(session, "*STB?") == str(STB_ESB | STB_RQS | STB_EAV).encode() + b"\n"


# ------------------------------------------------------------------------------------ SRQ
def test_srq_callback_and_serial_poll(instrument: Instrument) -> None:
    got: list[int] = []
    fired = threading.Event()

    def on_srq(stb: int) -> None:
        got.append(stb)
        fired.set()

    s = ScpiSession(instrument, on_srq=on_srq)
    try:
        s.write(b"SRQ 0")
        assert not s.has_output()               # SRQ is a command: no response
        assert fired.wait(5.0)
        assert got == [got[0]] and got[0] & STB_RQS
        assert s.status_byte() & STB_RQS
        assert s.serial_poll() & STB_RQS        # the poll reports RQS...
        assert s.serial_poll() & STB_RQS == 0   # ...and clears it
        assert s.status_byte() & STB_RQS == 0
    finally:
        s.close()


def test_srq_with_output_pending_reports_mav_too(instrument: Instrument) -> None:
    got: list[int] = []
    fired = threading.Event()

    def on_srq(stb: int) -> None:
        got.append(stb)
        fired.set()

    s = ScpiSession(instrument, on_srq=on_srq)
    try:
        s.write(b"*IDN?")
        s.write(b"SRQ 0")                       # (a separate message: its timer starts after *IDN? is queued)
        assert fired.wait(5.0)
        assert got[0] & (STB_RQS | STB_MAV) == STB_RQS | STB_MAV
    finally:
        s.close()


def test_cls_clears_a_pending_rqs(instrument: Instrument) -> None:
    fired = threading.Event()
    s = ScpiSession(instrument, on_srq=lambda stb: fired.set())
    try:
        s.write(b"SRQ 0")
        assert fired.wait(5.0)
        s.write(b"*CLS")
        assert s.serial_poll() & STB_RQS == 0
    finally:
        s.close()


def test_srq_without_callback_still_sets_rqs(session: ScpiSession) -> None:
    session.write(b"SRQ 0")
    timer = session._srq_timers[-1]
    timer.join(5.0)
    assert not timer.is_alive()
    assert session.serial_poll() & STB_RQS


def test_close_cancels_pending_srq_timers(instrument: Instrument) -> None:
    called: list[int] = []
    s = ScpiSession(instrument, on_srq=called.append)
    s.write(b"SRQ 60000")
    timer = s._srq_timers[-1]
    s.close()
    timer.join(5.0)
    assert not timer.is_alive()   # the timer thread is gone, so the callback can no longer run
    assert called == []
    assert s.serial_poll() & STB_RQS == 0
