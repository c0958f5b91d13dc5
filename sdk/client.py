"""The Python SDK: `Client` (a connection to the broker) and `Instrument` (PyVISA-style methods).

    from visabus.sdk import Client
    with Client() as bus:                        # $VISABUS_BROKER or tcp://127.0.0.1:5555
        scope = bus.open("TCPIP::127.0.0.1::hislip0::INSTR", timeout=5000)
        print(scope.query("*IDN?"))

One Client = one client session at the broker, kept alive by a heartbeat thread (its own socket), so
locks it takes are leased: they die with the process. A Client may be shared by threads (calls are
serialised); for parallel requests use one Client per thread.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import zmq

from . import schema
from .errors import ConnectionLost, StatusCode, VisaBusError, VisaTimeout, error_from_status
from .instrument import Instrument
from .transport import broker_url, make_socket

REPLY_MARGIN_S = 3.0   # how long past the request's own timeout we wait for the broker's verdict
HELLO_TIMEOUT_MS = 3000


class Client:
    def __init__(self, broker: str | None = None, *, name: str | None = None, timeout: int | None = 2000,
                 heartbeat: bool = True, ctx: zmq.Context | None = None) -> None:
        self.url = broker_url(broker)
        self.name = name or ""
        self.timeout = timeout  # default per-request timeout (ms) for instruments opened from this client
        self.sid = secrets.token_hex(8)
        self.ctx = ctx or zmq.Context.instance()
        self._sock = make_socket(self.ctx, zmq.DEALER, connect=self.url)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._closed = False
        info = self._hello()
        self.events_url: str = _reachable(info["events"], self.url)
        self.lease_ms: int = info.get("lease_ms", 10_000)
        self._heartbeat_ms: int = info.get("heartbeat_ms", 1000)
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        if heartbeat:
            self._beat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="visabus-heartbeat")
            self._beat.start()

    # ------------------------------------------------------------------------------ lifecycle
    def _hello(self) -> dict[str, Any]:
        try:
            header, _ = self.request("hello", timeout_ms=HELLO_TIMEOUT_MS, _margin=0.0, name=self.name)
        except VisaTimeout:
            self._sock.close(linger=0)
            raise ConnectionLost(f"no visabus broker answered at {self.url}; is `visabus serve` running? "
                                 "(set --broker or $VISABUS_BROKER)") from None
        return header

    def _heartbeat_loop(self) -> None:
        sock = make_socket(self.ctx, zmq.DEALER, connect=self.url)
        try:
            period = self._heartbeat_ms / 1000.0
            while not self._beat_stop.wait(period):
                sock.send(schema.pack({"v": schema.VERSION, "op": "heartbeat", "id": 0, "sid": self.sid}))
                while sock.poll(0):
                    sock.recv_multipart()
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._beat_stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
        with self._lock:
            try:  # release our locks now rather than at lease end
                self._sock.send(schema.pack({"v": schema.VERSION, "op": "bye", "id": 0, "sid": self.sid}),
                                flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._sock.close(linger=200)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ requests
    def request(self, op: str, res: str | None = None, data: tuple[Any, ...] | list[Any] = (),
                timeout_ms: int | None = None, *, _margin: float = REPLY_MARGIN_S,
                **fields: Any) -> tuple[dict[str, Any], list[Any]]:
        """Send one request and return (final reply header, all data frames). Raises VisaBusError on error."""
        frames: list[Any] = []
        final: dict[str, Any] = {}
        for header, part in self.exchange(op, res, data, timeout_ms, _margin=_margin, **fields):
            final = header
            frames += part
        return final, frames

    def exchange(self, op: str, res: str | None, data: tuple[Any, ...] | list[Any], timeout_ms: int | None, *,
                 _margin: float = REPLY_MARGIN_S, **fields: Any) -> Iterator[tuple[dict[str, Any], list[Any]]]:
        """Send a request; yield (reply header, data frames) per reply message until the final one.

        Streamed replies return one credit each time the consumer asks for the next message, so a slow
        consumer slows the worker down instead of filling memory anywhere. Abandoning the iterator cancels
        the request.
        """
        if self._closed:
            raise ConnectionLost("this visabus Client is closed")
        with self._lock:
            rid = next(self._ids)
            header = schema.request(op, rid, res=res, sid=self.sid, **fields)
            header["timeout_ms"] = timeout_ms
            self._sock.send_multipart([schema.pack(header), *data], copy=len(data) == 0)
            wait = None if timeout_ms is None else timeout_ms / 1000.0 + _margin
            finished = False
            try:
                while True:
                    reply, frames = self._recv_for(rid, wait, op)
                    status = reply.get("status", 0)
                    if status < 0:
                        finished = True
                        details = {k: v for k, v in reply.items() if k in ("outcome", "results", "duplicate")}
                        raise error_from_status(status, reply.get("msg", ""), details)
                    more = bool(reply.get("more"))
                    finished = not more
                    yield reply, frames
                    if not more:
                        return
                    self._sock.send(schema.pack({"v": schema.VERSION, "op": "credit", "id": 0, "sid": self.sid,
                                                 "target": rid, "n": 1}))
            finally:
                if not finished:
                    self._cancel(rid)

    def _recv_for(self, rid: int, wait: float | None, op: str) -> tuple[dict[str, Any], list[Any]]:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000) + 1):
                self._cancel(rid)
                raise VisaTimeout(f"{op}: no answer from the broker at {self.url} within {wait:.1f}s")
            frames = self._sock.recv_multipart(copy=False)
            try:
                reply = schema.unpack(frames[0].buffer)
            except schema.MalformedMessage:
                continue
            if reply.get("id") == rid:
                return reply, frames[1:]
            # A late reply to a request we already gave up on: drop it.

    def _cancel(self, rid: int) -> None:
        try:
            self._sock.send(schema.pack({"v": schema.VERSION, "op": "cancel", "id": 0, "sid": self.sid,
                                         "target": rid}), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------------------ directory
    def list_resources(self, query: str = "?*::INSTR") -> tuple[str, ...]:
        """Resource strings matching a VISA pattern (PyVISA's default pattern is '?*::INSTR')."""
        return tuple(r["res"] for r in self.resources(query))

    def resources(self, pattern: str = "?*") -> list[dict[str, Any]]:
        header, _ = self.request("list", pattern=pattern, timeout_ms=self.timeout)
        return list(header["resources"])

    def status(self) -> dict[str, Any]:
        header, _ = self.request("status", timeout_ms=self.timeout)
        return header

    def open(self, resource: str, *, timeout: int | None | str = "default", read_termination: str | None = "\n",
             write_termination: str | None = "\n", **attributes: Any) -> Instrument:
        """Open an instrument by resource string or alias (PyVISA's open_resource)."""
        t = self.timeout if isinstance(timeout, str) else timeout  # "default": this client's timeout
        header, _ = self.request("open", resource, timeout_ms=t)
        inst = Instrument(self, header["res"], alias=header.get("alias"), timeout=t,
                          read_termination=read_termination, write_termination=write_termination)
        for key, value in attributes.items():
            setattr(inst, key, value)
        return inst

    open_resource = open

    def events(self, prefix: str = "", timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over bus events whose topic starts with `prefix`; stops after `timeout` s of silence."""
        with self.subscribe(prefix) as stream:
            while True:
                event = stream.get(timeout)
                if event is None:
                    return
                yield event

    def subscribe(self, prefix: str = "") -> EventStream:
        """A live subscription, confirmed before this returns (no events are missed after it)."""
        return EventStream(self, prefix)


def _reachable(events: str, frontend: str) -> str:
    """A broker bound to a wildcard reports tcp://0.0.0.0:P; reach it where we reached the broker."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if events.startswith(wildcard) and frontend.startswith("tcp://"):
            host = frontend[len("tcp://"):].rsplit(":", 1)[0]
            return f"tcp://{host}:{events[len(wildcard):]}"
    return events


class EventStream:
    """A SUB socket on the broker's event stream. Counts events lost to overload (gaps in `seq`)."""

    def __init__(self, client: Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.dropped = 0
        self._last_seq: dict[str, int] = {}
        self._sock = make_socket(client.ctx, zmq.SUB, connect=client.events_url)
        self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self._confirm()

    def _confirm(self) -> None:
        """Ask the broker to publish a probe until we see it: the subscription is then live."""
        token = secrets.token_hex(6)
        topic = f"ping.{token}"
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                self.client.request("ping", token=token, timeout_ms=2000)
                if self._sock.poll(100):
                    while self._sock.poll(0):
                        parts = self._sock.recv_multipart()
                        if parts[0] == topic.encode():
                            return
            raise ConnectionLost(f"could not subscribe to events at {self.client.events_url}")
        finally:
            self._sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000)):
                return None
            topic, body = self._sock.recv_multipart()[:2]
            if topic.startswith(b"ping."):
                continue
            try:
                event = schema.unpack(body)
            except schema.MalformedMessage:
                continue
            seq, name = event.get("seq"), event.get("topic", "")
            if isinstance(seq, int):
                last = self._last_seq.get(name)
                if last is not None and seq > last + 1:
                    self.dropped += seq - last - 1  # lost to a full queue somewhere: counted, not hidden
                self._last_seq[name] = seq
            return event

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "EventStream", "Instrument", "StatusCode", "VisaBusError"]
