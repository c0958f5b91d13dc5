"""`Instrument`: one instrument reached through the bus, with PyVISA's MessageBasedResource vocabulary."""

from __future__ import annotations

import array
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import InvalidFormat

if TYPE_CHECKING:
    from .client import Client

ProgressCallback = Callable[[int, int | None], None]  # (bytes so far, total or None)


class LockGrant(str):
    """The access key returned by `lock()` (a str, as in PyVISA) that is also a context manager."""

    instrument: Instrument

    def __enter__(self) -> LockGrant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.instrument.unlock()


class Instrument:
    def __init__(self, client: Client, resource: str, *, alias: str | None = None, timeout: int | None = 2000,
                 read_termination: str | None = "\n", write_termination: str | None = "\n") -> None:
        self.client = client
        self.resource_name = resource
        self.alias = alias
        self.timeout = timeout                      # ms; None = wait forever (VISA VI_TMO_INFINITE)
        self.read_termination = read_termination
        self.write_termination = write_termination
        self.encoding = "ascii"
        self.chunk_size = 1 << 20                   # stream chunk size requested from the worker
        self.query_delay = 0.0                      # seconds between write and read in query()
        self.stream_credit = 4                      # chunks in flight during large reads
        self._closed = False

    def __repr__(self) -> str:
        return f"<Instrument {self.resource_name}{f' ({self.alias})' if self.alias else ''}>"

    # ------------------------------------------------------------------------------ plumbing
    def _call(self, op: str, data: Sequence[Any] = (), **fields: Any) -> tuple[dict[str, Any], list[Any]]:
        return self.client.request(op, self.resource_name, tuple(data), self.timeout, **fields)

    @property
    def _term_char(self) -> int | None:
        return ord(self.read_termination[-1]) if self.read_termination else None

    # ------------------------------------------------------------------------------ writing
    def write_raw(self, message: bytes) -> int:
        header, _ = self._call("write", (bytes(message),))
        return int(header.get("count", len(message)))

    def write(self, message: str, termination: str | None = None, encoding: str | None = None) -> int:
        term = self.write_termination if termination is None else termination
        if term and message.endswith(term):
            term = ""
        return self.write_raw((message + (term or "")).encode(encoding or self.encoding))

    # ------------------------------------------------------------------------------ reading
    def iter_read(self, *, message: bytes | None = None, size: int | None = None, block: bool = False,
                  term: bool = True, progress: ProgressCallback | None = None) -> Iterator[memoryview]:
        """Stream a response chunk by chunk (zero-copy frames); with `message`, write it first (a query).

        Memory stays bounded however large the response: the worker only reads ahead as far as the credit
        this iterator returns. `progress(done, total)` is called per chunk (`total` is known for blocks).
        """
        op = "query" if message is not None else "read"
        fields = dict(count=size, term=self._term_char if term and not block else None, block=block or None,
                      credit=self.stream_credit, chunk=self.chunk_size,
                      delay_ms=int(self.query_delay * 1000) if message is not None and self.query_delay else None)
        done = 0
        for header, frames in self.client.exchange(op, self.resource_name, (message,) if message is not None else (),
                                                   self.timeout, **{k: v for k, v in fields.items() if v is not None}):
            for frame in frames:
                view = frame.buffer
                done += len(view)
                if progress is not None:
                    progress(done, header.get("total"))
                yield view

    def read_raw(self, size: int | None = None, *, progress: ProgressCallback | None = None) -> bytes:
        """Read one whole response (up to END or the termination character), as bytes."""
        return b"".join(self.iter_read(size=size, progress=progress))

    def read_bytes(self, count: int, chunk_size: int | None = None, break_on_termchar: bool = False) -> bytes:
        """Read exactly `count` bytes (or fewer if the message ends first and break_on_termchar)."""
        out = bytearray()
        while len(out) < count:
            part = b"".join(self.iter_read(size=count - len(out), term=break_on_termchar))
            out += part
            if break_on_termchar or not part:
                break
        return bytes(out)

    def read(self, termination: str | None = None, encoding: str | None = None) -> str:
        term = self.read_termination if termination is None else termination
        text = self.read_raw().decode(encoding or self.encoding)
        if term and text.endswith(term):
            text = text[: -len(term)]
        return text

    def query(self, message: str, delay: float | None = None) -> str:
        """Write then read as one operation on the worker: no other client's request can slip between."""
        saved = self.query_delay
        if delay is not None:
            self.query_delay = delay
        try:
            raw = b"".join(self.iter_read(message=self._encode(message)))
        finally:
            self.query_delay = saved
        text = raw.decode(self.encoding)
        term = self.read_termination
        if term and text.endswith(term):
            text = text[: -len(term)]
        return text

    def _encode(self, message: str) -> bytes:
        term = self.write_termination or ""
        if term and message.endswith(term):
            term = ""
        return (message + term).encode(self.encoding)

    # ------------------------------------------------------------------------------ binary data
    def query_binary_block(self, message: str, *, progress: ProgressCallback | None = None,
                           out: bytearray | None = None) -> bytes | memoryview:
        """Query and return an IEEE 488.2 block's payload; the worker reads exactly the announced length.

        With `out`, the payload is written into that buffer (grown if needed) and a memoryview of it is
        returned: for repeated large reads this avoids allocating, and page-faulting in, a fresh buffer
        each time (which costs as much as the transfer itself on some VMs).
        """
        return _collect(self.iter_read(message=self._encode(message), block=True, progress=progress), out)

    def read_binary_block(self, *, progress: ProgressCallback | None = None,
                          out: bytearray | None = None) -> bytes | memoryview:
        return _collect(self.iter_read(block=True, progress=progress), out)

    def query_binary_values(self, message: str, datatype: str = "f", is_big_endian: bool = False,
                            container: Callable[[Iterable[Any]], Any] = list, header_fmt: str = "ieee",
                            expect_termination: bool = True, data_points: int | None = None,
                            chunk_size: int | None = None, progress: ProgressCallback | None = None) -> Any:
        if header_fmt not in ("ieee", "empty"):
            raise InvalidFormat(f"header_fmt {header_fmt!r} is not supported (use 'ieee' or 'empty')")
        if chunk_size:
            self.chunk_size = chunk_size
        if header_fmt == "ieee":
            payload = self.query_binary_block(message, progress=progress)
        else:
            payload = b"".join(self.iter_read(message=self._encode(message), term=False, progress=progress))
        return decode_values(payload, datatype, is_big_endian, container, data_points)

    def read_binary_values(self, datatype: str = "f", is_big_endian: bool = False,
                           container: Callable[[Iterable[Any]], Any] = list, **_: Any) -> Any:
        return decode_values(self.read_binary_block(), datatype, is_big_endian, container, None)

    def write_binary_values(self, message: str, values: Sequence[Any], datatype: str = "f",
                            is_big_endian: bool = False) -> int:
        arr = array.array(datatype, values)
        if is_big_endian != (sys.byteorder == "big"):
            arr.byteswap()
        body = arr.tobytes()
        length = str(len(body)).encode()
        block = b"#" + str(len(length)).encode() + length + body
        term = (self.write_termination or "").encode()
        return self.write_raw(message.encode(self.encoding) + block + term)

    # ------------------------------------------------------------------------------ control
    def clear(self) -> None:
        """Device clear; also interrupts a read of this instrument blocked in another client."""
        self._call("clear")

    def read_stb(self) -> int:
        header, _ = self._call("read_stb")
        return int(header["stb"])

    @property
    def stb(self) -> int:
        return self.read_stb()

    def assert_trigger(self) -> None:
        self._call("trigger")

    trigger = assert_trigger  # the protocol-level name, for readers of VXI-11/HiSLIP docs

    def remote(self) -> None:
        self._call("remote")

    def local(self) -> None:
        self._call("local")

    def get_attribute(self, name: str) -> Any:
        header, _ = self._call("get_attr", name=name)
        return header.get("value")

    def set_attribute(self, name: str, value: Any) -> None:
        self._call("set_attr", name=name, value=value)

    # ------------------------------------------------------------------------------ locks
    def lock(self, timeout: int | None | str = "default", requested_key: str | None = None,
             exclusive: bool | None = None) -> LockGrant:
        """Take the instrument's lock at the bus (shared when `requested_key` is given, else exclusive).

        Waits up to `timeout` ms for other holders. Returns the access key; usable as `with inst.lock():`.
        """
        excl = requested_key is None if exclusive is None else exclusive
        wait = self.timeout if isinstance(timeout, str) else timeout  # "default": the instrument's timeout
        header, _ = self.client.request("lock", self.resource_name, (), wait, exclusive=excl,
                                        key=None if excl else requested_key, lock_timeout_ms=wait)
        grant = LockGrant(header.get("key") or "")
        grant.instrument = self
        return grant

    def lock_excl(self, timeout: int | None | str = "default") -> LockGrant:
        return self.lock(timeout, exclusive=True)

    def lock_context(self, timeout: int | None | str = "default", requested_key: str | None = "exclusive") -> LockGrant:
        """PyVISA's lock_context: requested_key 'exclusive' (default) takes an exclusive lock."""
        if requested_key == "exclusive":
            return self.lock(timeout, exclusive=True)
        return self.lock(timeout, requested_key=requested_key, exclusive=False)

    def unlock(self) -> None:
        """Release one level of this client's lock (SessionNotLocked if it holds none)."""
        self._call("unlock")

    # ------------------------------------------------------------------------------ atomic groups
    def transaction(self, steps: Sequence[tuple[str, Any] | str]) -> list[Any]:
        """Run several operations atomically on the instrument; no other client's request interleaves.

        Steps: ("write", "CMD"), ("query", "CMD?"), ("read",), ("read_stb",), ("trigger",), ("clear",).
        Returns one result per step: None for write/trigger/clear, str for read/query, int for read_stb.
        """
        wire_steps: list[dict[str, Any]] = []
        frames: list[bytes] = []
        for step in steps:
            op, *args = (step,) if isinstance(step, str) else step
            item: dict[str, Any] = {"op": op}
            if op in ("write", "query"):
                frames.append(self._encode(args[0]))
                item["data"] = len(frames) - 1
            if op in ("read", "query"):
                item["term"] = self._term_char
            wire_steps.append(item)
        header, data = self._call("transaction", frames, steps=wire_steps)
        out: list[Any] = []
        for result in header["results"]:
            if "frame" in result:
                text = data[result["frame"]].bytes.decode(self.encoding)
                term = self.read_termination
                out.append(text[: -len(term)] if term and text.endswith(term) else text)
            elif "stb" in result:
                out.append(result["stb"])
            else:
                out.append(None)
        return out

    # ------------------------------------------------------------------------------ events
    def wait_for_srq(self, timeout: float | None = None) -> int | None:
        """Wait for a service request from this instrument; returns its status byte, or None on timeout.

        Subscribe first (`with inst.srq_events() as srq:` then `srq.get(timeout)`) when the SRQ may come
        before this call.
        """
        with self.srq_events() as stream:
            event = stream.get(timeout)
            return None if event is None else int(event.get("stb", 0))

    def srq_events(self) -> Any:
        return self.client.subscribe(f"srq.{self.resource_name}")

    # ------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.client.request("close", self.resource_name, timeout_ms=self.timeout)
            except Exception:  # closing must not raise (the broker may already be gone)
                pass

    def __enter__(self) -> Instrument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _collect(chunks: Iterator[memoryview], out: bytearray | None) -> bytes | memoryview:
    if out is None:
        return b"".join(chunks)
    n = 0
    for chunk in chunks:
        end = n + len(chunk)
        if end > len(out):
            out.extend(bytes(end - len(out)))
        out[n:end] = chunk
        n = end
    return memoryview(out)[:n]


def decode_values(payload: bytes | memoryview, datatype: str, is_big_endian: bool, container: Callable[[Iterable[Any]], Any],
                  data_points: int | None) -> Any:
    """Binary payload -> values, with struct/array type codes as PyVISA uses them."""
    if datatype in ("B", "b", "c", "s") and container in (bytes, bytearray):
        return container(payload)
    arr = array.array(datatype)
    if len(payload) % arr.itemsize:
        raise InvalidFormat(f"{len(payload)} bytes is not a whole number of {datatype!r} values "
                            f"({arr.itemsize} bytes each)")
    arr.frombytes(payload)
    if arr.itemsize > 1 and is_big_endian != (sys.byteorder == "big"):
        arr.byteswap()
    if data_points is not None and len(arr) != data_points:
        raise InvalidFormat(f"expected {data_points} values, got {len(arr)}")
    return container(arr)
