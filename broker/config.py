"""Rack configuration for `visabus serve` (TOML), validated at load with errors naming file and key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visabus.sdk.errors import InvalidResourceName
from visabus.sdk.resources import parse_resource
from visabus.sdk.transport import DEFAULT_BACKEND, DEFAULT_EVENTS, DEFAULT_FRONTEND

from .router import BrokerConfig

PROTOCOLS = ("socket", "vxi11", "hislip", "vicp")


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


@dataclass
class InstrumentConfig:
    resource: str
    name: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulatorConfig:
    protocols: list[str]
    identity: str = "VISABUS,SIM-1,0001,1.0"
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)   # protocol -> port (0 = ephemeral)
    attach: bool = True      # start a worker for each resource the simulator serves
    name: str | None = None  # alias prefix: NAME-socket, NAME-vxi11, ...
    advertise: str | None = None
    hislip_overlap: bool = False  # the HiSLIP server prefers overlapped mode (PyVISA-py cannot cope)


@dataclass
class DiscoveryConfig:
    enabled: bool = False
    interfaces: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    interval_s: float = 1.0
    misses: int = 3
    mdns: bool = True
    broadcast: bool = True
    portmapper_port: int = 111
    auto_attach: list[dict[str, str]] = field(default_factory=list)
    attach_on_demand: bool = False
    detach_grace_s: float = 30.0   # an auto-attached worker outlives its instrument's disappearance this long


@dataclass
class ServeConfig:
    broker: BrokerConfig
    instruments: list[InstrumentConfig]
    simulators: list[SimulatorConfig]
    discovery: DiscoveryConfig
    restart_max_backoff_s: float = 30.0
    source: str = "<defaults>"


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: expected {name}, got {value!r}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _endpoint(value: Any, where: str) -> str:
    text = _expect(value, str, where)
    if not text.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"{where}: {text!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555")
    return text


def parse_config(data: dict[str, Any], source: str = "<string>") -> ServeConfig:
    _check_keys(data, {"broker", "instrument", "simulator", "discovery", "supervisor"}, source)
    b = _expect(data.get("broker", {}), dict, f"{source}: [broker]")
    _check_keys(b, {"frontend", "backend", "events", "heartbeat_ms", "liveness", "lease_ms", "queue_limit",
                    "queue_bytes_limit", "grace_ms", "max_message_bytes"}, f"{source}: [broker]")
    broker = BrokerConfig(
        frontend=_endpoint(b.get("frontend", DEFAULT_FRONTEND), f"{source}: broker.frontend"),
        backend=_endpoint(b.get("backend", DEFAULT_BACKEND), f"{source}: broker.backend"),
        events=_endpoint(b.get("events", DEFAULT_EVENTS), f"{source}: broker.events"),
    )
    for key in ("heartbeat_ms", "liveness", "lease_ms", "queue_limit", "queue_bytes_limit", "grace_ms",
                "max_message_bytes"):
        if key in b:
            if _expect(b[key], int, f"{source}: broker.{key}") <= 0:
                raise ConfigError(f"{source}: broker.{key} must be positive")
            setattr(broker, key, b[key])

    instruments = []
    names: set[str] = set()
    for i, item in enumerate(_expect(data.get("instrument", []), list, f"{source}: [[instrument]]")):
        where = f"{source}: instrument[{i}]"
        _expect(item, dict, where)
        _check_keys(item, {"resource", "name", "attributes"}, where)
        res = _expect(item.get("resource"), str, f"{where}.resource")
        try:
            parse_resource(res)
        except InvalidResourceName as exc:
            raise ConfigError(f"{where}.resource: {exc.message}") from None
        name = item.get("name")
        if name is not None:
            _expect(name, str, f"{where}.name")
            if name in names:
                raise ConfigError(f"{where}.name: {name!r} is used twice")
            names.add(name)
        instruments.append(InstrumentConfig(res, name, _expect(item.get("attributes", {}), dict, f"{where}.attributes")))

    simulators = []
    for i, item in enumerate(_expect(data.get("simulator", []), list, f"{source}: [[simulator]]")):
        where = f"{source}: simulator[{i}]"
        _expect(item, dict, where)
        _check_keys(item, {"protocols", "identity", "host", "ports", "attach", "name", "advertise", "hislip_overlap"},
                    where)
        protocols = _expect(item.get("protocols", ["socket"]), list, f"{where}.protocols")
        for p in protocols:
            if p not in PROTOCOLS:
                raise ConfigError(f"{where}.protocols: {p!r} is not one of {', '.join(PROTOCOLS)}")
        ports = _expect(item.get("ports", {}), dict, f"{where}.ports")
        for p, port in ports.items():
            if p not in protocols or not isinstance(port, int) or not 0 <= port < 65536:
                raise ConfigError(f"{where}.ports.{p}: must be a port (0-65535) of a listed protocol")
        simulators.append(SimulatorConfig(
            protocols=protocols,
            identity=_expect(item.get("identity", "VISABUS,SIM-1,0001,1.0"), str, f"{where}.identity"),
            host=_expect(item.get("host", "127.0.0.1"), str, f"{where}.host"),
            ports=ports,
            attach=_expect(item.get("attach", True), bool, f"{where}.attach"),
            name=item.get("name"),
            advertise=item.get("advertise"),
            hislip_overlap=_expect(item.get("hislip_overlap", False), bool, f"{where}.hislip_overlap"),
        ))

    d = _expect(data.get("discovery", {}), dict, f"{source}: [discovery]")
    _check_keys(d, {"enabled", "interfaces", "interval_s", "misses", "mdns", "broadcast", "portmapper_port",
                    "auto_attach", "attach_on_demand", "detach_grace_s"}, f"{source}: [discovery]")
    discovery = DiscoveryConfig(
        enabled=_expect(d.get("enabled", False), bool, f"{source}: discovery.enabled"),
        interfaces=_expect(d.get("interfaces", ["127.0.0.1"]), list, f"{source}: discovery.interfaces"),
        interval_s=float(_expect(d.get("interval_s", 1.0), (int, float), f"{source}: discovery.interval_s")),
        misses=_expect(d.get("misses", 3), int, f"{source}: discovery.misses"),
        mdns=_expect(d.get("mdns", True), bool, f"{source}: discovery.mdns"),
        broadcast=_expect(d.get("broadcast", True), bool, f"{source}: discovery.broadcast"),
        portmapper_port=_expect(d.get("portmapper_port", 111), int, f"{source}: discovery.portmapper_port"),
        auto_attach=_expect(d.get("auto_attach", []), list, f"{source}: discovery.auto_attach"),
        attach_on_demand=_expect(d.get("attach_on_demand", False), bool, f"{source}: discovery.attach_on_demand"),
        detach_grace_s=float(_expect(d.get("detach_grace_s", 30.0), (int, float), f"{source}: discovery.detach_grace_s")),
    )
    for i, rule in enumerate(discovery.auto_attach):
        where = f"{source}: discovery.auto_attach[{i}]"
        _expect(rule, dict, where)
        _check_keys(rule, {"protocol", "manufacturer", "model", "serial"}, where)
        for key, value in rule.items():
            _expect(value, str, f"{where}.{key}")
    sup = _expect(data.get("supervisor", {}), dict, f"{source}: [supervisor]")
    _check_keys(sup, {"restart_max_backoff_s"}, f"{source}: [supervisor]")
    return ServeConfig(broker, instruments, simulators, discovery,
                       float(sup.get("restart_max_backoff_s", 30.0)), source)


def load_config(path: str | Path) -> ServeConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, str(p))
