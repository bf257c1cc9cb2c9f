"""What the gateway routes to: the ModelDeployments it watches, the names clients call them by, and each one's ready
pod addresses with the requests in flight to each. Pure state and decisions; kube.py fills it, proxy.py uses it."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from modeldeploy.api import Autoscaling, SpecError, parse_spec
from modeldeploy.manifests.common import LABEL_MDEP

Key = tuple[str, str]       # (namespace, ModelDeployment name)


@dataclass
class Model:
    """One ModelDeployment as the gateway needs it."""
    namespace: str
    name: str
    served_as: str                      # the name its servers answer to (spec.model.id), put in forwarded bodies
    ready: bool = False
    stalled: str | None = None          # why it cannot serve until its spec changes
    autoscaling: Autoscaling | None = None
    desired: int | None = None          # status.autoscaler.desiredReplicas: this gateway's last decision
    running: int | None = None          # status.desiredReplicas: what the operator runs
    created: int = 0

    @property
    def key(self) -> Key:
        return self.namespace, self.name

    def current_replicas(self) -> int:
        """The count the autoscaler moves from: its own last decision, else what runs, else the minimum."""
        for value in (self.desired, self.running):
            if isinstance(value, int):
                return value
        return self.autoscaling.min_replicas if self.autoscaling else 0


def model_from(body: dict) -> Model | None:
    """A ModelDeployment object (as the API server sends it) as a Model; None for a spec the types refuse."""
    meta, status = body["metadata"], body.get("status") or {}
    try:
        spec = parse_spec(body)
    except SpecError:
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    stalled = conditions.get("Stalled", {})
    return Model(
        namespace=meta["namespace"], name=meta["name"], served_as=spec.model.id,
        ready=conditions.get("Ready", {}).get("status") == "True",
        stalled=stalled.get("message") or stalled.get("reason") if stalled.get("status") == "True" else None,
        autoscaling=spec.autoscaling, desired=(status.get("autoscaler") or {}).get("desiredReplicas"),
        running=status.get("desiredReplicas"), created=created_seconds(meta.get("creationTimestamp")))


def created_seconds(timestamp: str | None) -> int:
    import datetime

    if not timestamp:
        return 0
    return int(datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


def ready_addresses(endpoints: dict, port_name: str = "http") -> list[str]:
    """`ip:port` of every ready address of an Endpoints object, on its port named `port_name` (not-ready addresses
    are listed apart by the endpoints controller and never taken)."""
    found = []
    for subset in endpoints.get("subsets") or []:
        port = next((p["port"] for p in subset.get("ports") or [] if p.get("name") == port_name), None)
        if port is None:
            continue
        found += [f"{a['ip']}:{port}" for a in subset.get("addresses") or []]
    return sorted(found)


def endpoints_key(endpoints: dict) -> Key | None:
    meta = endpoints["metadata"]
    return (meta["namespace"], meta["name"]) if (meta.get("labels") or {}).get(LABEL_MDEP) else None


def public_names(keys) -> dict[Key, str]:
    """The name each model is listed under: its ModelDeployment's name, or `namespace/name` where that name exists
    in more than one watched namespace."""
    counts = collections.Counter(name for _, name in keys)
    return {(ns, name): name if counts[name] == 1 else f"{ns}/{name}" for ns, name in keys}


def resolve(keys, asked: str) -> tuple[Key | None, list[str]]:
    """The model a request names: `name` when one watched namespace has it, or `namespace/name`. With no match,
    (None, the qualified names it might mean)."""
    if "/" in asked:
        namespace, _, name = asked.partition("/")
        return ((namespace, name) if (namespace, name) in keys else None), []
    matches = [key for key in keys if key[1] == asked]
    if len(matches) == 1:
        return matches[0], []
    return None, sorted(f"{ns}/{name}" for ns, name in matches)


def least_in_flight(addresses: list[str], in_flight: dict[str, int], start: int = 0) -> str:
    """The address with the fewest requests in flight; ties go to the first from `start` on (the caller rotates
    `start`, so an idle pool is used in turn)."""
    count = len(addresses)
    best = addresses[start % count]
    for i in range(1, count):
        candidate = addresses[(start + i) % count]
        if in_flight.get(candidate, 0) < in_flight.get(best, 0):
            best = candidate
    return best


@dataclass
class Pool:
    """One model's ready addresses and its requests: in flight per address, in all (held ones included), held."""
    addresses: list[str] = field(default_factory=list)
    in_flight: collections.Counter = field(default_factory=collections.Counter)
    requests: int = 0               # in the gateway now for this model: forwarded or held
    held: int = 0
    held_since: float | None = None  # the first request held while no replica was ready (a cold start's start)
    turn: int = 0
    available: asyncio.Event = field(default_factory=asyncio.Event)
    # The time-weighted requests in the gateway since the autoscaler last looked (area under `requests`).
    area: float = 0.0
    since: float = 0.0
    changed: float = 0.0

    def set_addresses(self, addresses: list[str]) -> None:
        self.addresses = addresses
        if addresses:
            self.available.set()
        else:
            self.available.clear()

    def pick(self, exclude: set[str] = frozenset()) -> str | None:
        candidates = [a for a in self.addresses if a not in exclude]
        if not candidates:
            return None
        self.turn += 1
        return least_in_flight(candidates, self.in_flight, self.turn)

    def add(self, delta: int, now: float) -> None:
        self.area += self.requests * (now - self.changed)
        self.changed = now
        self.requests += delta

    def average_since_last(self, now: float) -> float:
        """The mean number of requests in the gateway since the previous call, and a fresh start for the next."""
        self.add(0, now)
        span = now - self.since
        mean = self.area / span if span > 0 else float(self.requests)
        self.area, self.since = 0.0, now
        return mean
