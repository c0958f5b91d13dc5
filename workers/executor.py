"""The worker's executor thread: owns the instrument session and runs operations one at a time.

It also owns the worker's data socket to the broker: requests arrive and replies leave on it directly,
with no hand-off between threads on the hot path. Reads stream as chunks, each one spending a credit the
client returns as it consumes them, so a slow client bounds this process's memory.
While the instrument is unreachable the executor retries with exponential backoff and reports the
state (connecting -> ready -> lost -> ready ...).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from visabus.sdk import schema
from visabus.sdk.errors import (
    Aborted,
    ConnectionLost,
    InvalidParameter,
    NotSupported,
    ResourceNotFound,
    StatusCode,
    VisaBusError,
    VisaTimeout,
)
from visabus.sdk.transport import STREAM_HWM, make_socket

from .protocols.errors import ProtocolError
from .reader import ReadResult, read_block, read_message
from .sessions.base import Session

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
OPEN_TIMEOUT_S = 5.0
TRANSACTION_READ_LIMIT = 64 << 20  # transaction results are buffered, so bound them


@dataclass
class Job:
    header: dict[str, Any]
    frames: list[Any] = field(default_factory=list)
    n: int = 0  # the broker's dispatch number: a clear covering it (upto >= n) aborts it


class _Credit:
    """Stream credit for the running request, refilled by the control thread."""

    def __init__(self, initial: int) -> None:
        self._cond = threading.Condition()
        self._n = initial
        self.cancelled = False

    def add(self, n: int) -> None:
        with self._cond:
            self._n += n
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def take(self, timeout: float | None) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._n > 0 or self.cancelled, timeout):
                raise VisaTimeout("the client stopped accepting stream data (no credit returned within the timeout)")
            if self.cancelled:
                raise Aborted("request cancelled")
            self._n -= 1


class Executor(threading.Thread):
    def __init__(self, session: Session, ctx: zmq.Context, backend: str, wid: str, outbox: str,
                 stop: threading.Event) -> None:
        super().__init__(name="worker-executor", daemon=True)
        self.session = session
        self.ctx = ctx
        self.backend = backend
        self.wid = wid
        self.outbox = outbox
        self.stop = stop
        self.rehello = threading.Event()  # set by the control thread when the broker asks us to register again
        self.state = "connecting"
        self.state_detail = ""
        self.state_changed = threading.Event()
        self._out: zmq.Socket | None = None
        self._current: int | None = None
        self._credit: _Credit | None = None
        self._interrupted = False           # a cancel hit the running operation
        self.job_started: float | None = None  # monotonic start of the running operation
        self.cleared_upto = 0               # dispatch numbers <= this were covered by a device clear
        self._broker_instance: str | None = None  # dispatch numbers restart with every broker run
        self._cancelled: collections.deque[Any] = collections.deque(maxlen=64)  # cancels ahead of their job
        self._job: Job | None = None
        self._guard = threading.Lock()
        self._backoff = BACKOFF_FIRST_S
        self._next_attempt = 0.0
        self.res = session.resource.canonical

    # --------------------------------------------------------------- called from other threads
    def add_credit(self, bid: Any, n: int) -> None:
        with self._guard:
            if bid == self._current and self._credit is not None:
                self._credit.add(max(0, min(n, schema.MAX_CREDIT)))

    def cancel(self, bid: Any) -> None:
        with self._guard:
            if bid != self._current:
                # Dispatched but not started yet (the cancel overtook it on the control socket).
                self._cancelled.append(bid)
                return
            if self._credit is not None:
                self._credit.cancel()
            self._interrupted = True
        threading.Thread(target=self._abort_quietly, daemon=True, name="worker-abort").start()

    def _same_broker(self, instance: Any) -> None:
        """Forget clears and cancels of an earlier broker run (its numbering does not apply). Holds _guard."""
        if instance != self._broker_instance:
            self._broker_instance = instance
            self.cleared_upto = 0
            self._cancelled.clear()

    def _abort_quietly(self) -> None:
        try:
            self.session.abort()
        except VisaBusError as exc:
            log.info("worker.abort_failed", resource=self.res, error=exc.message)

    def run_clear(self, header: dict[str, Any]) -> dict[str, Any]:
        """Device clear, run on a control-side thread; a read blocked in the executor fails with ABORT."""
        with self._guard:
            self._same_broker(header.get("bi"))
            # Every operation the broker dispatched before this clear is aborted, whichever socket is faster.
            self.cleared_upto = max(self.cleared_upto, int(header.get("upto") or 0))
        try:
            self.session.clear()
            return schema.reply(header, 0, op="reply", more=False)
        except VisaBusError as exc:
            if isinstance(exc, (ConnectionLost, ResourceNotFound)):
                self._set_state("lost", exc.message)
            return schema.error_reply(header, exc.code, exc.message, op="reply")

    # --------------------------------------------------------------- the executor thread
    def run(self) -> None:
        self._out = make_socket(self.ctx, zmq.DEALER, connect=self.backend, hwm=STREAM_HWM)
        self._attach()
        self._try_open(OPEN_TIMEOUT_S)
        try:
            while not self.stop.is_set():
                if self.rehello.is_set():
                    self.rehello.clear()
                    self._attach()
                wait = 0.25 if self.session.connected else max(0.01, min(0.25, self._next_attempt - time.monotonic()))
                if not self._out.poll(int(wait * 1000)):
                    if not self.session.connected and time.monotonic() >= self._next_attempt:
                        self._try_open(OPEN_TIMEOUT_S)
                    continue
                frames = self._out.recv_multipart(copy=False)
                try:
                    header = schema.unpack(frames[0].buffer)
                except schema.MalformedMessage as exc:
                    log.warning("worker.malformed_from_broker", error=str(exc))
                    continue
                if header.get("op") == "reconnect":
                    self._attach()
                elif isinstance(header.get("op"), str) and header["op"] in schema.WORKER_JOB_OPS:
                    self._execute(Job(header, frames[1:], n=int(header.get("n") or 0)))
                else:
                    log.warning("worker.unknown_op", op=header.get("op"))
        finally:
            self._out.close(linger=500)

    def _attach(self) -> None:
        """Tell the broker this socket carries the requests of worker `wid` (see the control socket's ready)."""
        self._send({"v": schema.VERSION, "op": "attach", "wid": self.wid})

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state, self.state_detail = state, detail
            self.state_changed.set()
            log.info("worker.state", resource=self.res, state=state, detail=detail)

    def _try_open(self, timeout: float) -> bool:
        try:
            self.session.open(timeout)
        except VisaBusError as exc:
            self._next_attempt = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            # "lost" also after a failed first attempt: the broker must tell unreachable from still trying.
            self._set_state("lost", exc.message)
            return False
        self._backoff = BACKOFF_FIRST_S
        try:
            self.session.enable_srq(self._on_srq)
        except VisaBusError:
            pass  # protocol without service requests
        self._set_state("ready")
        return True

    def _mark_lost(self, why: str) -> None:
        self.session.close()
        self._next_attempt = time.monotonic() + self._backoff
        self._set_state("lost", why)

    def _on_srq(self, stb: int) -> None:
        push = make_socket(self.ctx, zmq.PUSH, connect=self.outbox)
        try:
            push.send(schema.pack({"v": schema.VERSION, "op": "event", "topic": f"srq.{self.res}",
                                   "data": {"res": self.res, "stb": int(stb)}}))
        finally:
            push.close(linger=1000)

    def _send(self, header: dict[str, Any], frames: Sequence[Any] = ()) -> None:
        assert self._out is not None
        self._out.send_multipart([schema.pack(header), *frames], copy=False)

    def _execute(self, job: Job) -> None:
        header = job.header
        bid = header.get("id")
        timeout_ms = header.get("timeout_ms", schema.DEFAULT_TIMEOUT_MS)
        timeout = None if timeout_ms is None else timeout_ms / 1000.0
        self.job_started = time.monotonic()
        with self._guard:
            self._same_broker(header.get("bi"))
            self._current = bid
            self._job = job
            self._interrupted = False
            self._credit = _Credit(max(1, min(int(header.get("credit") or schema.DEFAULT_CREDIT), schema.MAX_CREDIT)))
        was_connected = self.session.connected
        try:
            if not was_connected and not self._try_open(min(timeout or OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)):
                raise ConnectionLost(f"{self.res}: instrument not reachable ({self.state_detail}); "
                                     f"retrying every {self._backoff:.1f}s", outcome="not_executed")
            handler = getattr(self, f"_op_{header['op']}", None)
            if handler is None:
                raise NotSupported(f"operation {header['op']!r} is not supported by this worker")
            self.session.begin()
            self._check_interrupted()
            handler(job, timeout)
        except VisaBusError as exc:
            extra: dict[str, Any] = {}
            if isinstance(exc, ConnectionLost):
                self._mark_lost(exc.message)
                # Lost mid-operation: nobody can say whether the instrument acted on it.
                extra["outcome"] = exc.details.get("outcome", "unknown" if was_connected else "not_executed")
            self._send(schema.error_reply(header, exc.code, exc.message, op="reply", **extra))
        except ProtocolError as exc:
            self._mark_lost(str(exc))
            self._send(schema.error_reply(header, exc.code, f"{self.res}: protocol error: {exc}", op="reply"))
        except Exception as exc:  # a driver bug must not take the worker (and its instrument) down
            log.exception("worker.driver_bug", resource=self.res, op=header.get("op"))
            self._send(schema.error_reply(header, StatusCode.VI_ERROR_SYSTEM_ERROR,
                                          f"{self.res}: internal error in the driver: {exc!r}", op="reply"))
        finally:
            self.job_started = None
            with self._guard:
                self._current, self._credit, self._job = None, None, None

    # --------------------------------------------------------------- operations
    def _op_write(self, job: Job, timeout: float | None) -> None:
        count = self.session.write(job.frames[0].buffer, timeout)
        self._send(schema.reply(job.header, 0, op="reply", more=False, count=count))

    def _op_read(self, job: Job, timeout: float | None) -> None:
        self._stream_read(job.header, timeout)

    def _op_query(self, job: Job, timeout: float | None) -> None:
        self.session.write(job.frames[0].buffer, timeout)
        delay = job.header.get("delay_ms")
        if delay:
            time.sleep(delay / 1000.0)  # the caller asked for a query delay (VISA query_delay)
        self._check_interrupted()
        self._stream_read(job.header, timeout)

    def _check_interrupted(self) -> None:
        with self._guard:
            if self._interrupted or (self._job is not None and self._job.n <= self.cleared_upto) \
                    or self._current in self._cancelled:
                raise Aborted(f"{self.res}: operation aborted by a device clear or cancel")

    def _op_read_stb(self, job: Job, timeout: float | None) -> None:
        self._send(schema.reply(job.header, 0, op="reply", more=False, stb=self.session.read_stb()))

    def _op_trigger(self, job: Job, timeout: float | None) -> None:
        self.session.trigger()
        self._send(schema.reply(job.header, 0, op="reply", more=False))

    def _op_clear(self, job: Job, timeout: float | None) -> None:
        self.session.clear()
        self._send(schema.reply(job.header, 0, op="reply", more=False))

    def _op_remote(self, job: Job, timeout: float | None) -> None:
        self.session.remote()
        self._send(schema.reply(job.header, 0, op="reply", more=False))

    def _op_local(self, job: Job, timeout: float | None) -> None:
        self.session.local()
        self._send(schema.reply(job.header, 0, op="reply", more=False))

    def _op_fence(self, job: Job, timeout: float | None) -> None:
        """Take or release the instrument's own lock for the bus (fences out clients outside the bus)."""
        if job.header.get("lock"):
            self.session.lock(True, timeout)
        else:
            self.session.unlock()
        self._send(schema.reply(job.header, 0, op="reply", more=False))

    def _op_get_attr(self, job: Job, timeout: float | None) -> None:
        name = job.header["name"]
        attrs = self.session.attributes
        if hasattr(attrs, name) and name != "extra":
            value = getattr(attrs, name)
        elif name in attrs.extra:
            value = attrs.extra[name]
        else:
            raise NotSupported(f"{self.res}: unknown attribute {name!r}", StatusCode.VI_ERROR_NSUP_ATTR)
        self._send(schema.reply(job.header, 0, op="reply", more=False, value=value))

    def _op_set_attr(self, job: Job, timeout: float | None) -> None:
        self.session.set_attribute(job.header["name"], job.header.get("value"))
        self._send(schema.reply(job.header, 0, op="reply", more=False))

    def _op_transaction(self, job: Job, timeout: float | None) -> None:
        results: list[dict[str, Any]] = []
        frames: list[Any] = []
        for index, step in enumerate(job.header["steps"]):
            if not isinstance(step, dict) or step.get("op") not in schema.TRANSACTION_STEP_OPS:
                raise InvalidParameter(f"transaction step {index} is not one of {sorted(schema.TRANSACTION_STEP_OPS)}")
            try:
                results.append(self._run_step(step, job.frames, frames, timeout))
            except VisaBusError as exc:
                results.append({"op": step["op"], "status": int(exc.code), "name": exc.name, "msg": exc.message})
                extra = {"outcome": "unknown"} if isinstance(exc, ConnectionLost) else {}
                self._send(schema.error_reply(job.header, exc.code, f"transaction step {index} ({step['op']}): "
                                              f"{exc.message}", op="reply", results=results, **extra), frames)
                if isinstance(exc, ConnectionLost):
                    self._mark_lost(exc.message)
                return
        self._send(schema.reply(job.header, 0, op="reply", more=False, results=results), frames)

    def _run_step(self, step: dict[str, Any], inputs: list[Any], outputs: list[Any], timeout: float | None) -> dict[str, Any]:
        op = step["op"]
        result: dict[str, Any] = {"op": op, "status": 0}
        if op in ("write", "query"):
            index = step.get("data", 0)
            if not isinstance(index, int) or not 0 <= index < len(inputs):
                raise InvalidParameter(f"transaction {op} step names data frame {index!r}, which was not sent")
            result["count"] = self.session.write(inputs[index].buffer, timeout)
        if op in ("read", "query"):
            parts: list[memoryview] = []
            size = [0]

            def collect(view: memoryview) -> None:
                size[0] += len(view)
                if size[0] > TRANSACTION_READ_LIMIT:
                    raise InvalidParameter(f"transaction reads are limited to {TRANSACTION_READ_LIMIT} bytes; "
                                           "stream large data with a plain read")
                parts.append(view)

            read = self._read_with(collect, step, timeout)
            outputs.append(b"".join(parts))
            result.update(frame=len(outputs) - 1, count=read.count, read_status=int(read.status))
        elif op == "read_stb":
            result["stb"] = self.session.read_stb()
        elif op == "trigger":
            self.session.trigger()
        elif op == "clear":
            self.session.clear()
        return result

    def _read_with(self, emit: Any, header: dict[str, Any], timeout: float | None,
                   announce: Any = None) -> ReadResult:
        term = header.get("term")
        chunk = max(4096, min(int(header.get("chunk") or schema.DEFAULT_CHUNK), schema.MAX_CHUNK))
        if header.get("block"):
            return read_block(self.session, emit, timeout=timeout, term_char=term, chunk=chunk,
                              has_end=self.session.resource.protocol.value != "socket", announce=announce)
        return read_message(self.session, emit, timeout=timeout, term_char=term, count=header.get("count"), chunk=chunk)

    def _stream_read(self, header: dict[str, Any], timeout: float | None) -> None:
        """Stream the response; one chunk is held back so the last one travels with the final status."""
        held: list[memoryview] = []
        seq = [0]
        total: list[int | None] = [None]
        credit = self._credit
        assert credit is not None

        def announce(n: int) -> None:
            total[0] = n

        def emit(view: memoryview) -> None:
            if held:
                credit.take(timeout)
                self._send(schema.reply(header, 0, op="reply", more=True, seq=seq[0], total=total[0]), held)
                seq[0] += 1
                held.clear()
            held.append(view)

        try:
            result = self._read_with(emit, header, timeout, announce)
        except VisaBusError:
            if held and not credit.cancelled:
                credit.take(timeout)
                self._send(schema.reply(header, 0, op="reply", more=True, seq=seq[0], total=total[0]), held)
            raise
        self._send(schema.reply(header, int(result.status), op="reply", more=False, seq=seq[0], count=result.count,
                                end=result.end, block_len=result.block_len, total=total[0]), held)
