"""When the supervisor starts or retires workers on its own (sans-IO: events in, actions out).

- auto-attach: `instrument.appeared` matching a rule (protocol, manufacturer/model/serial glob patterns,
  case-insensitive) starts a worker for the matching resource; `instrument.disappeared` retires it after
  a grace period, cancelled if the instrument comes back.
- attach on demand: the broker's `attach.request` (a client opened a resource nobody serves) starts a
  worker; `attach.failed` (unreachable) retires it at once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from visabus.sdk.errors import VisaBusError
from visabus.sdk.resources import parse_resource


@dataclass(frozen=True)
class Action:
    kind: str        # "start" or "stop"
    res: str
    reason: str


def _matches(rule: dict[str, str], res: str, metadata: dict[str, Any]) -> bool:
    try:
        protocol = parse_resource(res).protocol.value
    except VisaBusError:
        return False
    if "protocol" in rule and rule["protocol"].lower() != protocol:
        return False
    for key in ("manufacturer", "model", "serial"):
        if key in rule and not fnmatch.fnmatch(str(metadata.get(key) or "").lower(), rule[key].lower()):
            return False
    return True


@dataclass
class AttachPolicy:
    rules: list[dict[str, str]]
    on_demand: bool
    grace_s: float
    attached: dict[str, str] = field(default_factory=dict)     # resource -> why it was attached
    detach_at: dict[str, float] = field(default_factory=dict)  # resource -> when to retire it

    def on_event(self, topic: str, data: dict[str, Any], now: float, served: set[str]) -> list[Action]:
        actions: list[Action] = []
        resources = [r for r in data.get("resources", []) if isinstance(r, str)]
        if topic == "attach.request" and self.on_demand:
            res = data.get("res")
            if isinstance(res, str) and res not in served:
                self.attached[res] = "on demand"
                actions.append(Action("start", res, f"opened by {data.get('client', 'a client')}"))
        elif topic == "attach.failed":
            res = data.get("res")
            if isinstance(res, str) and res in self.attached:
                del self.attached[res]
                actions.append(Action("stop", res, str(data.get("reason", "unreachable"))))
        elif topic in ("instrument.appeared", "instrument.changed"):
            metadata = data.get("metadata") or {}
            for res in resources:
                self.detach_at.pop(res, None)  # back before its grace ran out
                if res in served or res in self.attached:
                    continue
                if any(_matches(rule, res, metadata) for rule in self.rules):
                    self.attached[res] = "discovered"
                    actions.append(Action("start", res, "discovered and matches an auto_attach rule"))
        elif topic == "instrument.disappeared":
            for res in resources:
                if self.attached.get(res) == "discovered":
                    self.detach_at[res] = now + self.grace_s
        return actions

    def due(self, now: float) -> list[Action]:
        actions = []
        for res, when in list(self.detach_at.items()):
            if now >= when:
                del self.detach_at[res]
                self.attached.pop(res, None)
                actions.append(Action("stop", res, f"disappeared {self.grace_s:g}s ago"))
        return actions
