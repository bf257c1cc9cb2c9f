"""Events on a ModelDeployment, written with the operator's API client.

Not kopf.info/kopf.warn: those queue the Event through context that kopf sets only inside its own handlers, and the
progress refresher reconciles from outside them (a Stalled condition found there lost its Event)."""

from __future__ import annotations

import datetime
import logging

from kubernetes.client.rest import ApiException

COMPONENT = "modeldeploy-operator"
MESSAGE_LIMIT = 1024   # what kubectl describe shows in full; the API server refuses far longer messages

log = logging.getLogger("modeldeploy.operator")


def build_event(owner: dict, type: str, reason: str, message: str, now: datetime.datetime) -> dict:
    """A core/v1 Event about `owner` (a ModelDeployment body)."""
    meta = owner["metadata"]
    timestamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": type, "reason": reason, "message": (message or reason)[:MESSAGE_LIMIT],
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "firstTimestamp": timestamp, "lastTimestamp": timestamp, "count": 1,
    }


def post(core, owner, type: str, reason: str, message: str) -> None:
    """Writes the Event; a failure is logged, never raised: the status already says what the Event would."""
    owner = dict(owner)
    event = build_event(owner, type, reason, message, datetime.datetime.now(datetime.timezone.utc))
    try:
        core.create_namespaced_event(event["metadata"]["namespace"], event)
    except ApiException as error:
        log.warning("mdep %s/%s: could not post Event %s: %s", event["metadata"]["namespace"],
                    owner["metadata"]["name"], reason, error.reason)


def warn(core, owner, reason: str, message: str) -> None:
    post(core, owner, "Warning", reason, message)


def info(core, owner, reason: str, message: str) -> None:
    post(core, owner, "Normal", reason, message)
