"""The discovery inventory: observations in, instrument events out. Sans-IO: no sockets, no clock.

Inputs (each returns the events it caused, in order):

    observe(obs)                      a source saw a resource (a broadcast reply, a resolved mDNS record)
    seen(source, time, origin=…|resource=…)
                                      a source heard from a resource again (an mDNS liveness answer)
    withdraw(source, origin=…|resource=…, time)
                                      a source says a resource is gone (mDNS goodbye / TTL expiry)
    end_round(source, time)           a polling source finished one round (one broadcast scan, one mDNS
                                      liveness probe); resources of that source not seen in `misses`
                                      consecutive rounds are dropped — one lost packet is not a disappearance
    identify(resource, metadata, time) identification (*IDN?) learned who answers at a resource

Resources are grouped into instruments. A resource whose metadata names manufacturer and serial belongs to
the instrument with that identity; a resource without identity joins the one identified instrument at the
same address if there is exactly one (a VXI-11 broadcast reply carries no identity, the mDNS record of the
same box does) and keeps that identity while it lives; otherwise it is an instrument of its own, keyed by
address and protocol.

After each input the grouping is recomputed and compared with the previous one:

    instrument.appeared     a key that did not exist and shares no resource with an old key
    instrument.disappeared  a key whose resources are all gone (`reason`: "goodbye" or "missed")
    instrument.changed      resources, address or metadata changed (`changes`, `previous`), or the
                            instrument got a new key because it was identified (`previous_keys`)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

log = structlog.get_logger(__name__)

METADATA_FIELDS = ("manufacturer", "model", "serial", "firmware")
# Which resource an instrument is reached by first: the order a user would pick.
PROTOCOL_PREFERENCE = ("hislip", "vxi11", "vicp", "socket")
# Metadata sources in priority order: an *IDN? answer beats a TXT record beats nothing.
_METADATA_PRIORITY = ("identify", "mdns", "broadcast")

APPEARED = "instrument.appeared"
DISAPPEARED = "instrument.disappeared"
CHANGED = "instrument.changed"


class Source(enum.StrEnum):
    BROADCAST = "broadcast"
    MDNS = "mdns"


class Event(NamedTuple):
    topic: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Observation:
    """One sighting of a resource. `origin` names the record behind it (an mDNS service instance), so a
    record that now maps to another resource (the host changed address) replaces its old resource."""

    resource: str
    protocol: str
    address: str
    metadata: Mapping[str, str]
    source: str
    time: float
    origin: str | None = None


def clean_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Keep the four known fields with non-empty string values."""
    out: dict[str, str] = {}
    for name in METADATA_FIELDS:
        value = metadata.get(name)
        if isinstance(value, str) and value.strip():
            out[name] = value.strip()
    return out


def metadata_from_idn(idn: str) -> dict[str, str]:
    """'MFR,MODEL,SERIAL,FW' → metadata; missing or blank fields are left out."""
    parts = [p.strip() for p in idn.strip().split(",")]
    return clean_metadata(dict(zip(METADATA_FIELDS, parts, strict=False)))


def identity_key(metadata: Mapping[str, str]) -> str | None:
    manufacturer = metadata.get("manufacturer", "")
    serial = metadata.get("serial", "")
    if not manufacturer or not serial:
        return None
    return f"id:{manufacturer.casefold()}:{serial}"


def _protocol_rank(protocol: str) -> int:
    return PROTOCOL_PREFERENCE.index(protocol) if protocol in PROTOCOL_PREFERENCE else len(PROTOCOL_PREFERENCE)


@dataclass
class _Presence:
    """What one source knows about one resource."""

    metadata: dict[str, str]
    origin: str | None
    seen_this_round: bool = True
    misses: int = 0


@dataclass
class _Entry:
    resource: str
    protocol: str
    address: str
    presence: dict[str, _Presence] = field(default_factory=dict)
    identified: dict[str, str] = field(default_factory=dict)  # from *IDN?
    # The last identity known for this resource (its own, or adopted from the identified instrument at its
    # address): kept while the resource lives, so identity does not vanish with the records that told it.
    remembered: dict[str, str] = field(default_factory=dict)

    def metadata(self, own: bool = False) -> dict[str, str]:
        return _merge(_layers([self], own=own))


def _source_rank(source: str) -> int:
    return _METADATA_PRIORITY.index(source) if source in _METADATA_PRIORITY else len(_METADATA_PRIORITY)


def _layers(entries: Iterable[_Entry], own: bool = False) -> Iterable[Mapping[str, str]]:
    """Metadata of a group's resources, best source first: every *IDN? answer before any TXT record,
    and the identity a resource remembers last (unless `own`)."""
    entries = list(entries)
    for entry in entries:
        yield entry.identified
    sources = sorted({s for e in entries for s in e.presence}, key=_source_rank)
    for source in sources:
        for entry in entries:
            if source in entry.presence:
                yield entry.presence[source].metadata
    if not own:
        for entry in entries:
            yield entry.remembered


def _merge(layers: Iterable[Mapping[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for layer in layers:
        for name, value in layer.items():
            merged.setdefault(name, value)
    return merged


@dataclass(frozen=True)
class _Group:
    key: str
    resources: tuple[str, ...]
    protocols: tuple[str, ...]
    addresses: tuple[str, ...]
    metadata: tuple[tuple[str, str], ...]
    sources: tuple[str, ...]

    @property
    def address(self) -> str:
        return self.addresses[0]

    def compared(self) -> dict[str, Any]:
        return {"resources": list(self.resources), "address": self.address, "metadata": dict(self.metadata)}

    def as_event(self, time: float) -> dict[str, Any]:
        return {
            "key": self.key,
            "resources": list(self.resources),
            "protocol": self.protocols[0],
            "protocols": list(self.protocols),
            "address": self.address,
            "addresses": list(self.addresses),
            "metadata": dict(self.metadata),
            "sources": list(self.sources),
            "timestamp": time,
        }


class Inventory:
    """Live resources and the instruments they form. Not thread-safe: feed it from one thread."""

    def __init__(self, misses: int = 3) -> None:
        if not isinstance(misses, int) or misses < 1:
            raise ValueError(f"misses must be a positive integer, got {misses!r}")
        self.misses = misses
        self._entries: dict[str, _Entry] = {}
        self._origins: dict[tuple[str, str], str] = {}
        self._groups: dict[str, _Group] = {}

    # ----------------------------------------------------------------- inputs
    def observe(self, obs: Observation) -> list[Event]:
        source = str(obs.source)
        removed: list[str] = []
        if obs.origin is not None:
            previous = self._origins.get((source, obs.origin))
            if previous is not None and previous != obs.resource:
                removed = self._drop_presence(previous, source)
            self._origins[(source, obs.origin)] = obs.resource
        entry = self._entries.get(obs.resource)
        if entry is None:
            entry = self._entries[obs.resource] = _Entry(obs.resource, obs.protocol, obs.address)
        entry.address = obs.address
        presence = entry.presence.get(source)
        if presence is None:
            entry.presence[source] = _Presence(clean_metadata(obs.metadata), obs.origin)
        else:
            presence.metadata = clean_metadata(obs.metadata)
            presence.origin = obs.origin
            presence.seen_this_round = True
            presence.misses = 0
        return self._regroup(obs.time, reason="replaced" if removed else "")

    def seen(self, source: str, *, origin: str | None = None, resource: str | None = None) -> bool:
        """Mark a resource alive for this round without changing what is known about it. False when this
        source has no such resource (any more): the caller should `observe` it afresh."""
        if origin is not None:
            resource = self._origins.get((str(source), origin))
        entry = self._entries.get(resource) if resource is not None else None
        presence = entry.presence.get(str(source)) if entry is not None else None
        if presence is None:
            return False
        presence.seen_this_round = True
        return True

    def withdraw(
        self, source: str, time: float, *, origin: str | None = None, resource: str | None = None
    ) -> list[Event]:
        source = str(source)
        if origin is not None:
            resource = self._origins.pop((source, origin), None)
        if resource is None:
            return []
        self._drop_presence(resource, source)
        return self._regroup(time, reason="goodbye")

    def end_round(self, source: str, time: float) -> list[Event]:
        source = str(source)
        expired: list[str] = []
        for entry in self._entries.values():
            presence = entry.presence.get(source)
            if presence is None:
                continue
            if presence.seen_this_round:
                presence.seen_this_round = False
                presence.misses = 0
                continue
            presence.misses += 1
            if presence.misses >= self.misses:
                expired.append(entry.resource)
        for resource in expired:
            log.debug("discovery.resource_missed", resource=resource, source=source, rounds=self.misses)
            self._drop_presence(resource, source)
        return self._regroup(time, reason="missed") if expired else []

    def identify(self, resource: str, metadata: Mapping[str, str], time: float) -> list[Event]:
        entry = self._entries.get(resource)
        if entry is None:
            return []
        entry.identified = clean_metadata(metadata)
        return self._regroup(time, reason="")

    # ------------------------------------------------------------------ views
    def instruments(self, time: float = 0.0) -> list[dict[str, Any]]:
        """Current instruments as event-shaped dicts (what a one-shot scan returns)."""
        return [self._groups[k].as_event(time) for k in sorted(self._groups)]

    def resources(self) -> list[str]:
        return sorted(r for r, e in self._entries.items() if e.presence)

    def needs_identity(self, resource: str) -> bool:
        entry = self._entries.get(resource)
        return entry is not None and identity_key(entry.metadata()) is None

    # -------------------------------------------------------------- internals
    def _drop_presence(self, resource: str, source: str) -> list[str]:
        entry = self._entries.get(resource)
        if entry is None or entry.presence.pop(source, None) is None:
            return []
        for origin_key in [k for k, r in self._origins.items() if k[0] == source and r == resource]:
            del self._origins[origin_key]
        if not entry.presence:
            del self._entries[resource]
        return [resource]

    def _group(self) -> dict[str, _Group]:
        # Pass 1: who is identified by its own records, and which identities live at each address.
        own_at: dict[str, dict[str, list[_Entry]]] = {}
        for entry in self._entries.values():
            ident = identity_key(entry.metadata(own=True))
            if ident is not None:
                own_at.setdefault(entry.address, {}).setdefault(ident, []).append(entry)
        # Pass 2: a resource remembers its own identity; an anonymous one adopts the one identity at its
        # address. Either is kept while the resource lives: the goodbye of an instrument's mDNS records does
        # not make the VXI-11 responder at that address anonymous.
        members: dict[str, list[_Entry]] = {}
        for entry in self._entries.values():
            own = entry.metadata(own=True)
            if identity_key(own) is not None:
                entry.remembered = own
            else:
                at_address = own_at.get(entry.address, {})
                if len(at_address) == 1:
                    (identified,) = at_address.values()
                    entry.remembered = _merge(_layers(identified, own=True))
            key = identity_key(entry.metadata()) or f"addr:{entry.address}/{entry.protocol}"
            members.setdefault(key, []).append(entry)
        groups: dict[str, _Group] = {}
        for key, entries in members.items():
            entries.sort(key=lambda e: (_protocol_rank(e.protocol), e.resource))
            merged = _merge(_layers(entries))
            groups[key] = _Group(
                key=key,
                resources=tuple(e.resource for e in entries),
                protocols=tuple(e.protocol for e in entries),
                addresses=tuple(dict.fromkeys(e.address for e in entries)),
                metadata=tuple((n, merged[n]) for n in METADATA_FIELDS if n in merged),
                sources=tuple(sorted({s for e in entries for s in e.presence})),
            )
        return groups

    def _regroup(self, time: float, reason: str) -> list[Event]:
        old, new = self._groups, self._group()
        self._groups = new
        return list(_diff(old, new, time, reason))


def _diff(old: Mapping[str, _Group], new: Mapping[str, _Group], time: float, reason: str) -> Iterable[Event]:
    """Events that turn the `old` grouping into the `new` one."""
    succeeded: set[str] = set()
    for key in sorted(new):
        group = new[key]
        predecessors = sorted(
            k for k, g in old.items() if k != key and k not in new and set(g.resources) & set(group.resources)
        )
        succeeded.update(predecessors)
        before = old.get(key)
        if before is None and not predecessors:
            yield Event(APPEARED, group.as_event(time))
            continue
        data = group.as_event(time)
        if before is not None:
            was, now = before.compared(), group.compared()
            changes = [name for name in was if was[name] != now[name]]
            if not changes and not predecessors:
                continue
            data["changes"] = changes
            data["previous"] = {name: was[name] for name in changes}
        else:
            data["changes"] = ["key"]
            data["previous"] = {}
        if predecessors:
            data["previous_keys"] = predecessors
        yield Event(CHANGED, data)
    for key in sorted(old):
        if key in new or key in succeeded:
            continue
        data = old[key].as_event(time)
        data["reason"] = reason or "gone"
        yield Event(DISAPPEARED, data)
