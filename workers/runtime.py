"""The instrument worker: one process, one instrument session, operations executed in order.

Two threads, each owning its own ZeroMQ socket to the broker (sockets are not thread-safe):

- the control thread owns the control DEALER: it registers (`ready`, with a worker id), heartbeats (also
  while an instrument operation blocks) and handles out-of-band messages at once — `clear` (device clear
  while a read is blocked), `cancel` (abort the running operation) and `credit` (stream flow control);
- the executor thread owns the instrument session and the data DEALER (`attach`, same worker id): requests
  arrive and replies and stream chunks leave on it directly, so the hot path crosses no thread boundary.

If the broker goes silent for `liveness` heartbeats the control thread reconnects on a new socket and
registers again (Majordomo style); nothing is ever re-sent to the instrument.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
import zmq

from visabus.sdk import schema
from visabus.sdk.errors import ConnectionLost, StatusCode, VisaBusError
from visabus.sdk.resources import Resource, parse_resource
from visabus.sdk.transport import DEFAULT_BACKEND, STREAM_HWM, make_socket

from .executor import Executor
from .sessions import SessionAttributes, session_for

log = structlog.get_logger(__name__)

MAX_REJECTIONS = 4  # registration refusals (another live worker owns the resource) before giving up
BUSY_AFTER_S = 1.0  # an operation running this long is reported as state "busy" (not every request is)


class Worker:
    def __init__(self, resource: str | Resource, backend: str = DEFAULT_BACKEND, *, alias: str | None = None,
                 heartbeat_ms: int = 1000, liveness: int = 3, attributes: SessionAttributes | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.resource = resource if isinstance(resource, Resource) else parse_resource(resource)
        self.backend = backend
        self.alias = alias
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.liveness = liveness
        self.ctx = ctx or zmq.Context.instance()
        self.session = session_for(self.resource, attributes)
        self._stop = threading.Event()
        self.wid = secrets.token_hex(8)
        # Clear replies and SRQ events from other threads arrive here (PUSH -> PULL, any number of
        # producers); the control thread forwards them to the broker.
        self._outbox = f"inproc://worker-out-{id(self)}"
        self._from_exec = make_socket(self.ctx, zmq.PULL, bind=self._outbox, hwm=STREAM_HWM)
        self.executor = Executor(self.session, self.ctx, backend, self.wid, self._outbox, self._stop)
        self._dealer: zmq.Socket | None = None
        self.exit_code = 0
        self._rejections = 0
        self._register_at: float | None = None

    # ------------------------------------------------------------------------------ control loop
    def run(self) -> int:
        log.info("worker.starting", resource=self.resource.canonical, pid=os.getpid(), backend=self.backend)
        self.executor.start()
        self._connect()
        poller = zmq.Poller()
        poller.register(self._from_exec, zmq.POLLIN)
        broker_seen = time.monotonic()
        next_beat = 0.0
        last_state = self.executor.state
        try:
            while not self._stop.is_set():
                poller.register(self._dealer, zmq.POLLIN)
                ready = dict(poller.poll(int(self.heartbeat_s * 250)))
                now = time.monotonic()
                if self._from_exec in ready:
                    self._forward_from_executor()
                if self._dealer in ready:
                    broker_seen = now
                    self._drain_broker()
                if now - broker_seen > self.heartbeat_s * self.liveness:
                    log.warning("worker.broker_silent", resource=self.resource.canonical)
                    poller.unregister(self._dealer)
                    self._connect()
                    broker_seen = now
                if self._register_at is not None and now >= self._register_at:
                    self._register_at = None
                    self._register()
                state = self._reported_state(now)
                if now >= next_beat:
                    self._send({"v": schema.VERSION, "op": "heartbeat", "state": state,
                                "detail": self.executor.state_detail})
                    next_beat = now + self.heartbeat_s
                if self.executor.state_changed.is_set() or state != last_state:
                    self.executor.state_changed.clear()
                    self._send({"v": schema.VERSION, "op": "state", "state": state,
                                "detail": self.executor.state_detail})
                last_state = state
        finally:
            self._shutdown()
        return self.exit_code

    def stop(self) -> None:
        self._stop.set()

    def _reported_state(self, now: float) -> str:
        started = self.executor.job_started
        if self.executor.state == "ready" and started is not None and now - started > BUSY_AFTER_S:
            return "busy"
        return self.executor.state

    def _connect(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
        self._dealer = make_socket(self.ctx, zmq.DEALER, connect=self.backend, hwm=STREAM_HWM)
        self._register()

    def _register(self) -> None:
        self._send({"v": schema.VERSION, "op": "ready", "res": self.resource.canonical, "state": self.executor.state,
                    "alias": self.alias, "protocol": self.resource.protocol.value, "pid": os.getpid(),
                    "wid": self.wid, "fence": bool(self.session.attributes.extra.get("fence_locks"))})
        self.executor.rehello.set()  # a (re)registration needs the data socket attached again too

    def _send(self, header: dict[str, Any], frames: Sequence[Any] = ()) -> None:
        assert self._dealer is not None  # internal invariant, not input validation
        header = {k: v for k, v in header.items() if v is not None}
        self._dealer.send_multipart([schema.pack(header), *frames], copy=False)

    def _forward_from_executor(self) -> None:
        for _ in range(64):
            try:
                frames = self._from_exec.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            assert self._dealer is not None
            self._dealer.send_multipart(frames, copy=False)

    def _drain_broker(self) -> None:
        assert self._dealer is not None
        for _ in range(256):
            try:
                frames = self._dealer.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header = schema.unpack(frames[0].buffer)
            except schema.MalformedMessage as exc:
                log.warning("worker.malformed_from_broker", error=str(exc))
                continue
            self._on_broker_message(header, frames[1:])

    def _on_broker_message(self, header: dict[str, Any], data: list[Any]) -> None:
        op = header.get("op")
        if op == "heartbeat":
            return
        if op == "reconnect":
            if self._register_at is None:  # while refused, wait out the old owner's liveness period
                self._register()
        elif op == "reject":
            # Usually the worker we replace has not been declared dead yet: try again after the broker's
            # liveness period, and give up (exit code 3) only if another worker really owns the instrument.
            self._rejections += 1
            log.warning("worker.rejected", resource=self.resource.canonical, reason=header.get("msg"),
                        attempt=self._rejections)
            if self._rejections >= MAX_REJECTIONS:
                self.exit_code = 3
                self._stop.set()
            else:
                self._register_at = time.monotonic() + self.heartbeat_s * (self.liveness + 1)
        elif op == "disconnect":
            log.info("worker.broker_disconnect", resource=self.resource.canonical)
            self._stop.set()
        elif op == "credit":
            self.executor.add_credit(header.get("id"), int(header.get("n", 1)))
        elif op == "cancel":
            self.executor.cancel(header.get("id"))
        elif op == "clear":
            # Out of band: runs now, even while the executor is blocked in a read.
            threading.Thread(target=self._clear, args=(header,), daemon=True, name="worker-clear").start()
        else:
            log.warning("worker.unknown_op", op=op)

    def _clear(self, header: dict[str, Any]) -> None:
        reply = self.executor.run_clear(header)
        push = make_socket(self.ctx, zmq.PUSH, connect=self._outbox)
        try:
            push.send(schema.pack(reply))
        finally:
            push.close(linger=1000)

    def _shutdown(self) -> None:
        try:
            self._send({"v": schema.VERSION, "op": "bye"})
        except zmq.ZMQError:
            pass
        self._stop.set()
        self.executor.join(timeout=2.0)
        self.session.close()
        if self._dealer is not None:
            self._dealer.close(linger=200)
        self._from_exec.close(linger=0)
        log.info("worker.stopped", resource=self.resource.canonical)


__all__ = ["Worker", "ConnectionLost", "StatusCode", "VisaBusError"]
