"""Every ZeroMQ socket visabus makes is made here, so security (CurveZMQ + ZAP) can drop in at one spot.

Also holds the endpoint defaults and the rule for finding the broker: `--broker` / argument, else
$VISABUS_BROKER, else the loopback default.
"""

from __future__ import annotations

import os

import zmq

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_EVENTS = "tcp://127.0.0.1:5557"
ENV_BROKER = "VISABUS_BROKER"

# Bulk frames are large; default HWMs of 1000 messages would allow gigabytes in flight.
STREAM_HWM = 64
EVENT_HWM = 10_000


def broker_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV_BROKER) or DEFAULT_FRONTEND


def make_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None,
                identity: bytes | None = None, hwm: int | None = None, max_message: int | None = None) -> zmq.Socket:
    """Create, configure and bind/connect one socket. Returns it; the bound endpoint is in LAST_ENDPOINT."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if max_message is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    if kind == zmq.ROUTER:
        # Fail loudly (EHOSTUNREACH) instead of silently dropping replies to vanished peers.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind in (zmq.DEALER, zmq.ROUTER):
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    if bind is not None:
        sock.bind(bind)
    if connect is not None:
        sock.connect(connect)
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint actually bound (resolves tcp://host:0 to the ephemeral port)."""
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)
