"""HiSLIP transactions driven through two fake ends, no sockets (h11's ConnectionPair idea).

`HislipClient` (client state) and `HislipServerCore`/`ServerSession` (server state, with the real SCPI
engine behind it) exchange messages as bytes: every message is encoded and re-parsed by a
`HislipReader`, so the sequences exercise the codec too. The harness plays the thin drivers' part:
it routes `Outgoing` actions, fetches responses for `AwaitResponse`, and records lock deadlines.
"""

from __future__ import annotations

import pytest

from visabus.sim.scpi import Instrument, ScpiSession
from visabus.workers.protocols import hislip as h
from visabus.workers.protocols.errors import LocalProtocolError
from visabus.workers.protocols.hislip_client import HislipClient, Phase, ServerError, ServerFatalError
from visabus.workers.protocols.hislip_server_state import (
    Action,
    AwaitResponse,
    Channel,
    HislipServerCore,
    Outgoing,
    ScheduleLockExpiry,
    ServerSession,
    SessionPhase,
)

T = h.MessageType
SYNC, ASYNC = Channel.SYNC, Channel.ASYNC
FIRST = h.INITIAL_MESSAGE_ID


class Wire:
    """One direction of one channel: messages go in as bytes and come out re-parsed."""

    def __init__(self) -> None:
        self.reader = h.HislipReader(max_payload=1 << 28)
        self.sent: list[bytes] = []

    def put(self, message: h.Message) -> None:
        raw = message.encode()
        self.sent.append(raw)
        self.reader.feed(raw)

    def take(self) -> list[h.Message]:
        return list(self.reader.messages())


class Rack:
    """The server side: core + SCPI engines; routes actions to the client ends."""

    def __init__(self, *, prefer_overlap: bool = False, max_message_size: int = 1 << 20, max_sessions: int = 8,
                 hold_responses: bool = False) -> None:
        self.instruments = {"hislip0": Instrument(), "hislip1": Instrument(identity="SECOND,SIM,2,1")}
        self.engines: dict[int, ScpiSession] = {}
        self.core = HislipServerCore(["hislip0", "hislip1"], self._engine, prefer_overlap=prefer_overlap,
                                     max_message_size=max_message_size, max_sessions=max_sessions)
        self.links: dict[int, Link] = {}
        self.deadlines: list[float] = []
        self.hold_responses = hold_responses
        self.held: list[tuple[ServerSession, AwaitResponse]] = []

    def _engine(self, name: str, session_id: int) -> ScpiSession:
        engine = self.engines[session_id] = ScpiSession(self.instruments[name])
        return engine

    def dispatch(self, session: ServerSession | None, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Outgoing):
                self.links[action.session_id].to_client[action.channel].put(action.message)
            elif isinstance(action, ScheduleLockExpiry):
                self.deadlines.append(action.deadline)
            elif isinstance(action, AwaitResponse) and session is not None:
                if self.hold_responses:
                    self.held.append((session, action))
                else:
                    self.respond(session, action)

    def respond(self, session: ServerSession, ticket: AwaitResponse) -> None:
        data = self.engines[session.session_id].wait_response(timeout=0)
        assert data is not None, "the engine had no response ready"
        for message in session.response_messages(ticket, data):
            self.links[session.session_id].to_client[SYNC].put(message)


class Link:
    """A client end: HislipClient plus the four wires of its two channels."""

    def __init__(self, rack: Rack, sub_address: str = "hislip0", **client_options: object) -> None:
        self.rack = rack
        self.client = HislipClient(sub_address, **client_options)  # type: ignore[arg-type]
        self.to_server = {SYNC: Wire(), ASYNC: Wire()}
        self.to_client = {SYNC: Wire(), ASYNC: Wire()}
        self.session: ServerSession | None = None

    # --- handshake -------------------------------------------------------------------------------
    def initialize(self) -> h.Message:
        self.to_server[SYNC].put(self.client.initialize())
        [first] = self.to_server[SYNC].take()
        session, reply = self.rack.core.initialize(first)
        if session is not None:
            self.session = session
            self.rack.links[session.session_id] = self
        self.to_client[SYNC].put(reply)
        [reply] = self.to_client[SYNC].take()
        return reply

    def connect(self) -> Link:
        self.client.receive_initialize_response(self.initialize())
        self.to_server[ASYNC].put(self.client.async_initialize())
        [first] = self.to_server[ASYNC].take()
        _, reply = self.rack.core.async_initialize(first)
        self.to_client[ASYNC].put(reply)
        [reply] = self.to_client[ASYNC].take()
        self.client.receive_async_initialize_response(reply)
        self.client.receive_maximum_message_size_response(self.request(self.client.maximum_message_size()))
        return self

    # --- traffic ---------------------------------------------------------------------------------
    def send(self, channel: Channel, message: h.Message, now: float = 0.0, deliver: bool = True) -> None:
        self.to_server[channel].put(message)
        if deliver:
            self.pump(channel, now)

    def pump(self, channel: Channel, now: float = 0.0) -> None:
        assert self.session is not None
        for message in self.to_server[channel].take():
            if channel is SYNC:
                actions = self.session.receive_sync(message)
            else:
                actions = self.session.receive_async(message, now)
            self.rack.dispatch(self.session, actions)

    def request(self, message: h.Message, now: float = 0.0) -> h.Message:
        self.send(ASYNC, message, now)
        [reply] = self.to_client[ASYNC].take()
        return reply

    def write(self, text: str, deliver: bool = True) -> list[h.Message]:
        messages = self.client.data_messages(text.encode())
        for message in messages:
            self.send(SYNC, message, deliver=deliver)
        return messages

    def read(self) -> bytes | None:
        """Accepted response bytes up to a DataEnd (None if no complete response arrived)."""
        data = bytearray()
        for message in self.to_client[SYNC].take():
            if message.type is T.INTERRUPTED:
                self.client.receive_interrupted(message.message_id)
                data.clear()
            elif message.type in (T.DATA, T.DATA_END) and self.client.accept_data(message.type, message.message_id):
                data += message.payload
                if message.type is T.DATA_END:
                    self.client.response_delivered(message.message_id)
                    return bytes(data)
        return None

    def query(self, text: str) -> bytes | None:
        self.write(text)
        return self.read()

    def status(self) -> int:
        return HislipClient.receive_status_response(self.request(self.client.status_query()))

    def lock(self, key: str = "", timeout_ms: int = 0, now: float = 0.0) -> h.LockResult | None:
        self.send(ASYNC, self.client.lock_request(timeout_ms, key), now)
        replies = self.to_client[ASYNC].take()
        return HislipClient.receive_lock_response(replies[0]) if replies else None

    def unlock(self) -> h.LockResult:
        return HislipClient.receive_lock_response(self.request(self.client.lock_release()))

    def async_replies(self) -> list[h.Message]:
        return self.to_client[ASYNC].take()

    def clear(self) -> None:
        ack = self.request(self.client.begin_clear())
        complete = self.client.receive_async_device_clear_acknowledge(ack)
        self.send(SYNC, complete)
        final = [m for m in self.to_client[SYNC].take() if m.type is T.DEVICE_CLEAR_ACKNOWLEDGE]
        self.client.receive_device_clear_acknowledge(final[-1])

    def close(self) -> None:
        assert self.session is not None
        self.rack.dispatch(None, self.rack.core.remove(self.session.session_id))


@pytest.fixture
def rack() -> Rack:
    return Rack()


# ------------------------------------------------------------------------------------ handshake
def test_handshake_bytes_and_negotiation(rack: Rack) -> None:
    link = Link(rack, max_message_size=4096).connect()
    assert link.to_server[SYNC].sent[0] == bytes.fromhex("4853 0000 01005642 0000000000000007") + b"hislip0"
    assert link.to_client[SYNC].sent[0] == bytes.fromhex("4853 0100 01000001 0000000000000000")
    assert link.to_server[ASYNC].sent[0] == bytes.fromhex("4853 1100 00000001 0000000000000000")
    assert link.client.phase is Phase.READY and link.client.session_id == 1
    assert (link.client.server_version, link.client.server_vendor, link.client.overlapped) == (0x0100, "VB", False)
    assert link.client.server_max_message_size == 1 << 20
    assert link.session is not None and link.session.client_max_message_size == 4096
    assert link.session.phase is SessionPhase.READY


def test_two_sessions_get_distinct_ids_and_their_own_sub_address(rack: Rack) -> None:
    first, second = Link(rack).connect(), Link(rack, "hislip1").connect()
    assert first.client.session_id != second.client.session_id
    assert second.query("*IDN?\n") == b"SECOND,SIM,2,1\n"
    assert first.query("*IDN?\n") == b"VISABUS,SIM-1,0001,1.0\n"


def test_empty_sub_address_means_the_default_device(rack: Rack) -> None:
    link = Link(rack, "").connect()
    assert link.session is not None and link.session.device.name == "hislip0"


def test_unknown_sub_address_is_a_fatal_error(rack: Rack) -> None:
    link = Link(rack, "hislip9")
    reply = link.initialize()
    assert reply.type is T.FATAL_ERROR and reply.control == h.FatalErrorCode.INVALID_INITIALIZATION
    with pytest.raises(ServerFatalError, match="unknown sub-address 'hislip9'"):
        link.client.receive_initialize_response(reply)
    assert link.client.phase is Phase.FAILED and not rack.core.sessions


def test_too_many_clients() -> None:
    rack = Rack(max_sessions=1)
    Link(rack).connect()
    reply = Link(rack).initialize()
    assert reply.type is T.FATAL_ERROR and reply.control == h.FatalErrorCode.MAX_CLIENTS_EXCEEDED


def test_async_initialize_with_unknown_session_id(rack: Rack) -> None:
    session, reply = rack.core.async_initialize(h.async_initialize(77))
    assert session is None and reply.type is T.FATAL_ERROR
    assert reply.control == h.FatalErrorCode.INVALID_INITIALIZATION


def test_probe_that_closes_after_initialize_leaves_nothing_behind(rack: Rack) -> None:
    link = Link(rack)
    link.client.receive_initialize_response(link.initialize())
    assert link.session is not None and link.session.phase is SessionPhase.AWAIT_ASYNC
    link.close()
    assert not rack.core.sessions and rack.core.devices["hislip0"].locks.info() == (False, 0)


def test_data_before_async_channel_is_fatal(rack: Rack) -> None:
    link = Link(rack)
    link.client.receive_initialize_response(link.initialize())
    link.send(SYNC, h.data_end(FIRST, b"*IDN?\n"))
    [fatal] = link.to_client[SYNC].take()
    assert fatal.type is T.FATAL_ERROR and fatal.control == h.FatalErrorCode.CHANNELS_NOT_ESTABLISHED
    assert link.session is not None and link.session.closed


# ------------------------------------------------------------------------------------ data and MessageIDs
def test_query_message_ids_and_rmt_delivered(rack: Rack) -> None:
    link = Link(rack).connect()
    [sent] = link.write("*IDN?\n")
    assert (sent.type, sent.message_id, sent.rmt_delivered) == (T.DATA_END, FIRST, False)
    [response] = link.to_client[SYNC].take()
    assert (response.type, response.message_id) == (T.DATA_END, FIRST)  # synchronized: echoes our id
    assert link.client.accept_data(T.DATA_END, response.message_id)
    link.client.response_delivered(response.message_id)
    [second] = link.write("VOLT 2\n")
    assert (second.message_id, second.rmt_delivered) == (FIRST + 2, True)  # RMT reported once
    [third] = link.write("VOLT?\n")
    assert (third.message_id, third.rmt_delivered) == (FIRST + 4, False)
    assert link.read() == b"2.0\n"


def test_message_ids_wrap_through_zero(rack: Rack) -> None:
    link = Link(rack).connect()
    ids = [link.write("VOLT 1\n")[0].message_id for _ in range(130)]
    assert ids[127] == 0xFFFFFFFE and ids[128] == 0 and ids[129] == 2


def test_long_write_is_split_to_the_server_maximum_and_each_message_takes_an_id() -> None:
    rack = Rack(max_message_size=h.MIN_MESSAGE_SIZE)
    link = Link(rack).connect()
    text = "ECHO? " + "x" * 600 + "\n"
    messages = link.write(text)
    assert [m.type for m in messages] == [T.DATA, T.DATA, T.DATA_END]
    assert all(h.HEADER_SIZE + len(m.payload) <= h.MIN_MESSAGE_SIZE for m in messages)
    assert [m.message_id for m in messages] == [FIRST, FIRST + 2, FIRST + 4]
    assert link.read() == ("x" * 600 + "\n").encode()


def test_response_is_split_to_the_client_maximum(rack: Rack) -> None:
    link = Link(rack, max_message_size=h.MIN_MESSAGE_SIZE).connect()
    link.write("WAV:POIN 1000\n")
    link.write("WAV:DATA?\n")
    messages = link.to_client[SYNC].take()
    assert [m.type for m in messages[:-1]] == [T.DATA] * (len(messages) - 1) and messages[-1].type is T.DATA_END
    assert all(h.HEADER_SIZE + len(m.payload) <= h.MIN_MESSAGE_SIZE for m in messages)
    assert {m.message_id for m in messages} == {FIRST + 2}
    body = b"".join(bytes(m.payload) for m in messages)
    assert body == b"#41000" + bytes(i % 256 for i in range(1000)) + b"\n"


def test_stale_response_with_old_message_id_is_discarded(rack: Rack) -> None:
    link = Link(rack).connect()
    link.write("ECHO? old\n")
    link.write("ECHO? new\n")  # the client never read the first answer
    assert link.read() == b"new\n"


def test_overlapped_server_counts_its_own_ids_and_pipelines() -> None:
    rack = Rack(prefer_overlap=True)
    link = Link(rack).connect()
    assert link.client.overlapped
    for word in ("a", "b", "c"):
        link.write(f"ECHO? {word}\n")
    replies = link.to_client[SYNC].take()
    assert [m.message_id for m in replies] == [FIRST, FIRST + 2, FIRST + 4]
    assert [bytes(m.payload) for m in replies] == [b"a\n", b"b\n", b"c\n"]
    assert all(link.client.accept_data(m.type, m.message_id) for m in replies)


# ------------------------------------------------------------------------------------ status query and MAV
def test_mav_in_synchronized_mode(rack: Rack) -> None:
    link = Link(rack).connect()
    assert link.client.status_query().message_id == h.MESSAGE_ID_NONE_SENT
    link.write("*IDN?\n")  # response sent, not yet delivered
    query = link.client.status_query()
    assert (query.message_id, query.rmt_delivered) == (FIRST, False)  # the last id SENT, not the next one
    assert HislipClient.receive_status_response(link.request(query)) & 0x10
    assert link.read() is not None
    query = link.client.status_query()
    assert query.rmt_delivered
    assert HislipClient.receive_status_response(link.request(query)) & 0x10 == 0


def test_status_query_that_overtook_a_sync_message_reports_no_mav(rack: Rack) -> None:
    link = Link(rack).connect()
    link.write("*IDN?\n")
    link.write("VOLT 1\n", deliver=False)  # still in flight on the sync channel
    assert link.status() & 0x10 == 0


def test_mav_in_overlapped_mode_follows_the_last_delivered_response() -> None:
    rack = Rack(prefer_overlap=True)
    link = Link(rack).connect()
    link.write("ECHO? a\n")
    assert link.status() & 0x10
    assert link.read() == b"a\n"
    assert link.client.status_query().message_id == FIRST  # server's id of the response delivered
    assert link.status() & 0x10 == 0


def test_overlapped_mav_is_settled_as_soon_as_the_last_message_is_handed_out() -> None:
    rack = Rack(prefer_overlap=True, hold_responses=True)
    link = Link(rack).connect()
    link.write("ECHO? z\n")
    session, ticket = rack.held.pop()
    messages = session.response_messages(ticket, rack.engines[1].wait_response(timeout=0) or b"")
    last = next(messages)  # the driver sends it; the generator is not resumed yet
    assert last.type is T.DATA_END
    link.client.response_delivered(last.message_id)
    assert link.status() & 0x10 == 0


# ------------------------------------------------------------------------------------ interrupted
def _interrupt(rack: Rack, link: Link) -> tuple[h.Message, h.Message]:
    link.write("ECHO? first\n")
    [(session, ticket)] = rack.held
    rack.held.clear()
    link.write("ECHO? second\n", deliver=False)
    actions = session.interrupt(ticket, FIRST + 2)
    rack.dispatch(session, actions)
    [async_msg] = link.to_client[ASYNC].take()
    return async_msg, link.to_client[SYNC].take()[0]


def test_interrupted_async_first_discards_data_until_interrupted() -> None:
    rack = Rack(hold_responses=True)
    link = Link(rack).connect()
    async_msg, sync_msg = _interrupt(rack, link)
    assert (async_msg.type, async_msg.message_id, sync_msg.type) == (T.ASYNC_INTERRUPTED, FIRST + 2, T.INTERRUPTED)
    link.client.receive_async_interrupted(async_msg.message_id)
    assert not link.client.accept_data(T.DATA_END, FIRST + 2)  # until Interrupted arrives
    link.client.receive_interrupted(sync_msg.message_id)
    assert link.client.accept_data(T.DATA_END, FIRST + 2)
    link.pump(SYNC)
    rack.respond(*rack.held[0])
    assert link.read() == b"second\n"


def test_interrupted_sync_first_holds_sends_until_async_interrupted() -> None:
    rack = Rack(hold_responses=True)
    link = Link(rack).connect()
    async_msg, sync_msg = _interrupt(rack, link)
    link.client.receive_interrupted(sync_msg.message_id)
    assert not link.client.may_send
    with pytest.raises(LocalProtocolError):
        link.client.data_messages(b"*IDN?\n")
    link.client.receive_async_interrupted(async_msg.message_id)
    assert link.client.may_send and link.client.accept_data(T.DATA_END, FIRST + 2)


@pytest.mark.parametrize("order", ["AASS", "ASAS", "SSAA", "SAAS", "ASSA"])
def test_two_interruptions_pair_up_by_message_id_in_any_order(order: str) -> None:
    client = Link(Rack()).connect().client
    queues = {"A": [FIRST + 2, FIRST + 4], "S": [FIRST + 2, FIRST + 4]}
    for side in order:
        message_id = queues[side].pop(0)
        if side == "A":
            client.receive_async_interrupted(message_id)
        else:
            client.receive_interrupted(message_id)
    assert client.may_send and client.accept_data(T.DATA_END, client.last_sent_id)


# ------------------------------------------------------------------------------------ device clear
def test_device_clear_sequence_resets_ids_and_drops_output() -> None:
    rack = Rack(hold_responses=True)
    link = Link(rack).connect()
    link.write("*IDN?\n")
    assert rack.engines[1].has_output()
    request = link.client.begin_clear()
    assert request == h.async_device_clear() and link.client.phase is Phase.CLEARING_ASYNC
    ack = link.request(request)
    assert ack.type is T.ASYNC_DEVICE_CLEAR_ACKNOWLEDGE and not ack.overlapped
    assert not rack.engines[1].has_output()
    with pytest.raises(LocalProtocolError):
        link.client.data_messages(b"VOLT 7\n")  # the client sends nothing while clearing...
    link.send(SYNC, h.data_end(FIRST + 2, b"VOLT 7\n"))  # ...and the server drops what was in flight
    assert rack.instruments["hislip0"].voltage == 0.0
    complete = link.client.receive_async_device_clear_acknowledge(ack)
    assert complete == h.device_clear_complete(False)
    link.send(SYNC, complete)
    [final] = link.to_client[SYNC].take()
    assert final == h.device_clear_acknowledge(False)
    link.client.receive_device_clear_acknowledge(final)
    assert link.client.phase is Phase.READY and link.client.next_id == FIRST
    assert link.client.status_query().message_id == h.MESSAGE_ID_NONE_SENT
    assert link.session is not None and link.session.last_received_id == h.MESSAGE_ID_NONE_SENT
    ticket_ids = [ticket.message_id for _, ticket in rack.held]
    [sent] = link.write("*IDN?\n")
    assert sent.message_id == FIRST and rack.held[-1][1].message_id == FIRST and ticket_ids == [FIRST]


def test_response_in_flight_stops_at_clear() -> None:
    rack = Rack(hold_responses=True)
    link = Link(rack, max_message_size=h.MIN_MESSAGE_SIZE).connect()
    link.write("WAV:POIN 5000\n")
    link.write("WAV:DATA?\n")
    session, ticket = rack.held.pop()
    messages = session.response_messages(ticket, rack.engines[1].wait_response(timeout=0) or b"")
    first = next(messages)
    assert first.type is T.DATA
    link.request(link.client.begin_clear())
    assert next(messages, None) is None  # the rest of the response is dropped


def test_clear_renegotiates_overlapped_mode(rack: Rack) -> None:
    link = Link(rack, request_overlap=True).connect()
    assert not link.client.overlapped
    link.clear()
    assert link.client.overlapped and link.session is not None and link.session.overlapped
    for word in ("x", "y"):
        link.write(f"ECHO? {word}\n")
    assert [bytes(m.payload) for m in link.to_client[SYNC].take()] == [b"x\n", b"y\n"]


def test_clear_fails_a_pending_lock_request_before_acknowledging(rack: Rack) -> None:
    holder, waiter = Link(rack).connect(), Link(rack).connect()
    assert holder.lock() is h.LockResult.SUCCESS
    assert waiter.lock(timeout_ms=5000) is None  # pending
    waiter.send(ASYNC, waiter.client.begin_clear())
    replies = waiter.async_replies()
    assert [m.type for m in replies] == [T.ASYNC_LOCK_RESPONSE, T.ASYNC_DEVICE_CLEAR_ACKNOWLEDGE]
    assert replies[0].control == h.LockResult.FAILURE
    assert holder.unlock() is h.LockResult.SUCCESS
    assert waiter.async_replies() == []  # the cancelled request is not granted later


# ------------------------------------------------------------------------------------ locks
def test_exclusive_lock_between_two_sessions(rack: Rack) -> None:
    a, b = Link(rack).connect(), Link(rack).connect()
    assert a.lock(timeout_ms=1000) is h.LockResult.SUCCESS
    assert a.lock() is h.LockResult.ERROR  # redundant
    assert b.lock() is h.LockResult.FAILURE  # timeout 0: no wait
    assert a.session is not None and b.session is not None
    assert a.session.may_access() and not b.session.may_access()
    assert HislipClient.receive_lock_info_response(b.request(h.async_lock_info())) == (True, 1)
    assert b.unlock() is h.LockResult.ERROR  # nothing to release
    assert a.unlock() is h.LockResult.SUCCESS
    assert b.session.may_access()
    assert HislipClient.receive_lock_info_response(a.request(h.async_lock_info())) == (False, 0)


def test_waiting_lock_is_granted_on_release(rack: Rack) -> None:
    a, b = Link(rack).connect(), Link(rack).connect()
    a.lock()
    assert b.lock(timeout_ms=2500, now=100.0) is None
    assert rack.deadlines == [102.5]
    assert a.unlock() is h.LockResult.SUCCESS
    [granted] = b.async_replies()
    assert granted == h.async_lock_response(h.LockResult.SUCCESS)
    assert rack.dispatch(None, rack.core.expire_locks(200.0)) is None and b.async_replies() == []


def test_waiting_lock_times_out(rack: Rack) -> None:
    a, b = Link(rack).connect(), Link(rack).connect()
    a.lock()
    b.lock(timeout_ms=1000, now=10.0)
    rack.dispatch(None, rack.core.expire_locks(10.5))
    assert b.async_replies() == []
    rack.dispatch(None, rack.core.expire_locks(11.0))
    assert b.async_replies() == [h.async_lock_response(h.LockResult.FAILURE)]


def test_shared_locks_with_keys_and_both_state(rack: Rack) -> None:
    a, b, c = Link(rack).connect(), Link(rack).connect(), Link(rack).connect()
    assert a.lock("bench") is h.LockResult.SUCCESS
    assert b.lock("bench") is h.LockResult.SUCCESS
    assert a.lock("bench") is h.LockResult.ERROR  # holder asks again
    assert c.lock("other") is h.LockResult.FAILURE  # wrong key
    assert c.lock("") is h.LockResult.FAILURE  # exclusive needs to be a shared holder
    assert c.session is not None and not c.session.may_access()
    assert a.lock("") is h.LockResult.SUCCESS  # shared holder upgrades: "both"
    assert b.session is not None and not b.session.may_access()
    assert HislipClient.receive_lock_info_response(c.request(h.async_lock_info())) == (True, 2)
    assert a.unlock() is h.LockResult.SUCCESS  # exclusive goes first
    assert a.unlock() is h.LockResult.SUCCESS_SHARED
    assert b.unlock() is h.LockResult.SUCCESS_SHARED
    assert c.lock("") is h.LockResult.SUCCESS


def test_closing_a_holder_releases_and_grants_the_waiter(rack: Rack) -> None:
    a, b = Link(rack).connect(), Link(rack).connect()
    a.lock()
    b.lock(timeout_ms=5000)
    a.close()
    assert b.async_replies() == [h.async_lock_response(h.LockResult.SUCCESS)]


def test_release_waits_for_the_quoted_message(rack: Rack) -> None:
    link = Link(rack).connect()
    link.lock()
    [held_back] = link.write("VOLT 3\n", deliver=False)
    release = link.client.lock_release()
    assert release.message_id == held_back.message_id
    link.send(ASYNC, release)
    assert link.async_replies() == []  # deferred: VOLT 3 not processed yet
    link.pump(SYNC)
    replies = link.async_replies()
    assert replies == [h.async_lock_response(h.LockResult.SUCCESS)]
    assert rack.instruments["hislip0"].voltage == 3.0


def test_lock_request_while_unlock_pending_is_an_error(rack: Rack) -> None:
    link = Link(rack).connect()
    link.lock()
    link.write("VOLT 3\n", deliver=False)
    link.send(ASYNC, link.client.lock_release())
    link.send(ASYNC, link.client.lock_request(0, ""))
    [reply] = link.async_replies()
    assert reply.type is T.ERROR
    with pytest.raises(ServerError):
        HislipClient.receive_lock_response(reply)


# ------------------------------------------------------------------------------------ misc transactions
def test_trigger_consumes_a_message_id_and_reaches_the_device(rack: Rack) -> None:
    link = Link(rack).connect()
    message = link.client.trigger()
    assert (message.type, message.message_id) == (T.TRIGGER, FIRST)
    link.send(SYNC, message)
    assert rack.instruments["hislip0"].triggers == 1
    assert link.query("*IDN?\n") is not None  # the next message carries FIRST + 2 and is answered


def test_service_request_goes_to_the_async_channel(rack: Rack) -> None:
    link = Link(rack).connect()
    assert link.session is not None
    rack.dispatch(link.session, link.session.service_request(0x50))
    assert link.async_replies() == [h.async_service_request(0x50)]


def test_remote_local_control(rack: Rack) -> None:
    link = Link(rack).connect()
    state = rack.core.devices["hislip0"].remote_local
    reply = link.request(link.client.remote_local(h.RemoteLocal.ENABLE_REMOTE_GO_TO_REMOTE_LOCK_OUT_LOCAL))
    assert reply.type is T.ASYNC_REMOTE_LOCAL_RESPONSE and state.remote and state.local_lockout
    link.request(link.client.remote_local(h.RemoteLocal.GO_TO_LOCAL))
    assert not state.remote and state.local_lockout
    link.request(link.client.remote_local(h.RemoteLocal.DISABLE_REMOTE))
    link.write("VOLT 1\n")
    assert not state.remote  # remote disabled: data does not switch to remote
    bad = link.request(h.Message(T.ASYNC_REMOTE_LOCAL_CONTROL, 9, FIRST))
    assert bad.type is T.ERROR and bad.control == h.ErrorCode.UNRECOGNIZED_CONTROL_CODE


def test_messages_on_the_wrong_channel_get_error_replies(rack: Rack) -> None:
    link = Link(rack).connect()
    link.send(SYNC, h.async_lock_info())
    [reply] = link.to_client[SYNC].take()
    assert reply.type is T.ERROR and reply.control == h.ErrorCode.UNRECOGNIZED_MESSAGE_TYPE
    reply = link.request(h.data_end(FIRST, b"x"))
    assert reply.type is T.ERROR and "asynchronous" in reply.text()
    assert link.query("*IDN?\n") is not None  # the session goes on
