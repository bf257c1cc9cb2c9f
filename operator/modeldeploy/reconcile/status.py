"""Conditions and phase, kstatus-compatible: `Ready` with observedGeneration, plus `Reconciling` while work is
under way and `Stalled` when it cannot go on until something changes - so `kubectl wait --for=condition=Ready`,
Argo CD and Flux all read the resource's health."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

CACHE_READY, WEIGHTS_READY, AVAILABLE, READY = "CacheReady", "WeightsReady", "Available", "Ready"
RECONCILING, STALLED = "Reconciling", "Stalled"
ORDER = (READY, CACHE_READY, WEIGHTS_READY, AVAILABLE, RECONCILING, STALLED)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Observation:
    """What one reconcile found, condition by condition; turned into `status` by `status_patch`."""
    generation: int
    cache: tuple[bool, str, str] | None = None       # (ok, reason, message)
    weights: tuple[bool, str, str] | None = None
    available: tuple[bool, str, str] | None = None
    stalled: tuple[str, str] | None = None           # (reason, message): cannot progress without a change
    fields: dict = field(default_factory=dict)        # other status fields (resolvedRevision, download, ...)
    retry: str | None = None                          # waiting on something outside the spec: look again soon
    retry_delay: float = 15                           # seconds until then
    progress_in_log: bool = False                     # a pull pod runs: its progress is refreshed on a timer


def merge_condition(previous: list[dict], kind: str, ok: bool | None, reason: str, message: str,
                    generation: int) -> dict:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    old = next((c for c in previous if c.get("type") == kind), None)
    changed = old is None or old.get("status") != status
    # Never an empty message: the API client sends empty strings as null, which the schema refuses.
    return {"type": kind, "status": status, "reason": reason, "message": (message or reason)[:1000],
            "lastTransitionTime": now() if changed else old.get("lastTransitionTime", now()),
            "observedGeneration": generation}


def status_patch(observation: Observation, previous: list[dict]) -> tuple[dict, list[tuple[dict, dict | None]]]:
    """The new status, and the conditions whose status changed (new, old) for Events."""
    g = observation.generation
    conditions = []
    for kind, value in ((CACHE_READY, observation.cache), (WEIGHTS_READY, observation.weights),
                        (AVAILABLE, observation.available)):
        if value is None:
            value = (None, "Waiting", "waiting for the previous step")
        conditions.append(merge_condition(previous, kind, *value, generation=g))
    steps = [observation.cache, observation.weights, observation.available]
    ready = all(step is not None and step[0] for step in steps)
    if observation.stalled:
        reason, message = observation.stalled
        conditions.append(merge_condition(previous, STALLED, True, reason, message, g))
        conditions.append(merge_condition(previous, RECONCILING, False, reason, "stopped: " + message, g))
        conditions.append(merge_condition(previous, READY, False, reason, message, g))
        phase = "Failed"
    else:
        conditions.append(merge_condition(previous, STALLED, False, "Progressing", "", g))
        first_pending = next((s for s in steps if s is None or not s[0]), None)
        if ready:
            conditions.append(merge_condition(previous, RECONCILING, False, "Ready", "", g))
            conditions.append(merge_condition(previous, READY, True, "Ready", "all replicas are ready", g))
            phase = "Ready"
        else:
            reason, message = (first_pending[1], first_pending[2]) if first_pending else ("Waiting", "")
            conditions.append(merge_condition(previous, RECONCILING, True, reason, message, g))
            conditions.append(merge_condition(previous, READY, False, reason, message, g))
            phase = {CACHE_READY: "Pending", WEIGHTS_READY: "Pulling", AVAILABLE: "Deploying"}[
                (CACHE_READY, WEIGHTS_READY, AVAILABLE)[steps.index(first_pending)]] if first_pending else "Pending"
    conditions.sort(key=lambda c: ORDER.index(c["type"]))
    changed = []
    for condition in conditions:
        old = next((c for c in previous if c.get("type") == condition["type"]), None)
        if old is None or old.get("status") != condition["status"] or old.get("reason") != condition["reason"]:
            changed.append((condition, old))
    status = {"observedGeneration": g, "phase": phase, "conditions": conditions, **observation.fields}
    return status, changed


# -- writing it ------------------------------------------------------------------------------------------------------
PROGRESS_REASONS = {"Waiting", "Creating", "Sizing", "Expanding", "WaitingForFirstConsumer", "ClaimPending", "Pruning",
                    "Pulling",
                    "RollingOut", "ReplicasNotReady", "Ready", "Progressing"}


class StaleRead(Exception):
    """The resource changed after it was read, so its status was not written over."""


def write_status(apis, body, observation: Observation, previous: list[dict]) -> dict | None:
    """Writes the status over the version that was read (resourceVersion as a precondition: refused with 409 if
    the resource changed since), then posts one Event per transition a person wants to see. None: nothing to write
    (unchanged) or the resource is gone."""
    from kubernetes.client.rest import ApiException

    from modeldeploy.api import GROUP, PLURAL, VERSION
    from modeldeploy.reconcile import events, metrics
    from modeldeploy.reconcile.children import went, wrote_status

    status, changed = status_patch(observation, previous)
    meta = body["metadata"]
    if unchanged(body.get("status") or {}, status):
        return status
    try:
        written = apis.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
            {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status})
        wrote_status(apis, body, written)
    except ApiException as error:
        if error.status == 404:
            went(apis, body)      # deleted meanwhile (or while the watch was down: its view still had it)
            return None
        if error.status == 409:
            raise StaleRead() from error
        raise
    warned = status.get("warnedRemoteCode")
    if warned is not None and (body.get("status") or {}).get("warnedRemoteCode") != warned:
        events.warn(apis.core, body, "TrustRemoteCode", "runtime.trustRemoteCode is on: the model's own Python code "
                                                        "will run in the serving pods")
    # A stall turns both Stalled and the step's own condition, with one reason: one Event for both.
    to_post: dict[tuple[str, str], str] = {}
    for condition, _old in changed:
        kind, ok, reason = condition["type"], condition["status"] == "True", condition["reason"]
        if kind == STALLED and ok:
            to_post.setdefault(("Warning", reason), condition["message"])
            if observation.weights is not None and not observation.weights[0]:
                metrics.PULL_FAILURES.labels(reason).inc()
        elif kind in (WEIGHTS_READY, READY) and ok:     # the pull's outcome and the resource's; the rest is status
            to_post.setdefault(("Normal", kind), condition["message"])
        elif kind in (CACHE_READY, WEIGHTS_READY, AVAILABLE) and not ok and reason not in PROGRESS_REASONS:
            to_post.setdefault(("Warning", reason), condition["message"])
    for (type_, reason), message in to_post.items():
        events.post(apis.core, body, type_, reason, message)
    return status


def unchanged(old: dict, new: dict) -> bool:
    """Whether merging `new` into `old` would change nothing (a value of None removes a field). Unchanged
    conditions keep their timestamps (merge_condition), so a reconcile that found nothing new writes nothing."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            if not unchanged(old[key], value):
                return False
        elif value is None:
            if old.get(key) is not None:
                return False
        elif old.get(key) != value:
            return False
    return True
