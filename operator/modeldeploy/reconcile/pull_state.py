"""What a pull Job says: done (with the puller's result), failed (why, and whether for good) or still pulling.

The Job's conditions decide; its pods only add detail (the puller's reason, OOMKilled, why a pod waits or does not
schedule), because pods are ephemeral: garbage-collected, evicted, gone with their node. The result, once read from
a pod's termination message, is kept on the Job itself (an annotation), so a finished Job whose pods are gone still
says which commit it pulled; so is a permanent failure, which stays the answer while a Job without podFailurePolicy
(Kubernetes before 1.26) starts the pods its backoffLimit allows. Pure functions over the objects as the API returns
them (dicts), so the decisions are unit-tested over recorded objects."""

from __future__ import annotations

import json
from dataclasses import dataclass

from modeldeploy.pull.errors import EXITS_FOR_GOOD, Reason

RESULT_ANNOTATION = "modeldeploy.io/pull-result"
REASONS = {reason.value for reason in Reason}
WAITING_REASONS = {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
                   "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


@dataclass
class PullState:
    done: bool = False
    failed: bool = False
    permanent: bool = False
    reason: str = "Pulling"
    message: str = "pulling the weights into the cache"
    result: dict | None = None        # the puller's final JSON line (done, or failed for good)
    rerun: bool = False               # finished, but its result is lost with its pods: run it again (0 bytes)


def true_conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def terminated(pod: dict) -> dict | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if (state := (status.get("state") or {}).get("terminated")) is not None:
            return state
    return None


def final_line(state: dict | None) -> dict | None:
    try:
        line = json.loads((state or {}).get("message") or "")
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def recorded_line(job: dict) -> dict | None:
    """The puller's final line as the operator kept it on the Job: its result, or its permanent failure."""
    return final_line({"message": ((job.get("metadata") or {}).get("annotations") or {}).get(RESULT_ANNOTATION)})


def completed_result(job: dict, pods: list[dict]) -> dict | None:
    """The puller's `complete` line: from the Job's annotation, else from a pod that exited 0 with it."""
    annotated = recorded_line(job)
    if annotated and annotated.get("event") == "complete":
        return annotated
    for pod in pods:
        state = terminated(pod)
        line = final_line(state)
        if state and state.get("exitCode") == 0 and line and line.get("event") == "complete":
            return line
    return None


def said(line: dict) -> tuple[str, str]:
    """The reason and message of a `failed` line. It comes from a pod's termination message or the Job's annotation,
    which whoever may edit the namespace's pods and Jobs can write: only the puller's own reasons are taken, and
    the message as text (a number or a list would fail the status write against the CRD's schema)."""
    reason = line.get("reason")
    reason = reason if isinstance(reason, str) and reason in REASONS else "PullFailed"
    message = line.get("message")
    return reason, (message if isinstance(message, str) and message else reason)[:1000]


def recorded_failure(job: dict) -> PullState | None:
    line = recorded_line(job)
    if line is None or line.get("event") != "failed":
        return None
    reason, message = said(line)
    return PullState(failed=True, permanent=True, reason=reason, message=message, result=line)


def newest_first(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def owned(pods: list[dict], job: dict) -> list[dict]:
    """The Job's own pods: a Job deleted and made again under the same name (the way to try a failed pull again)
    leaves its pods, with the same job-name label, for a moment (or for good, deleted with --cascade=orphan), and
    their failures are not the new Job's."""
    uid = (job.get("metadata") or {}).get("uid")
    if not uid:
        return pods
    return [pod for pod in pods
            if any(owner.get("uid") == uid for owner in (pod.get("metadata") or {}).get("ownerReferences") or [])]


def failure_of(pod: dict) -> PullState | None:
    """Why a pull pod failed, if it did: the puller's own reason, else the container's (OOMKilled), else its code."""
    state = terminated(pod)
    if state is None or state.get("exitCode") == 0:
        return None
    line = final_line(state)
    if line and line.get("event") == "failed":
        reason, message = said(line)
        permanent = state.get("exitCode") in EXITS_FOR_GOOD or reason == Reason.NO_SPACE.value
        return PullState(failed=True, permanent=permanent, reason=reason, message=message, result=line)
    if state.get("reason") == "OOMKilled":
        return PullState(failed=True, reason="OOMKilled", message="the pull pod ran out of memory (pull.resources)")
    return PullState(failed=True, reason="PullFailed",
                     message=f"the pull pod exited with {state.get('exitCode')} ({state.get('reason') or 'Error'})")


def waiting_of(pod: dict) -> PullState | None:
    """A pull pod that cannot start: unschedulable, its image or its Secret missing."""
    scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"),
                     None)
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return PullState(reason="Unschedulable", message=f"the pull pod cannot be scheduled: {scheduled.get('message')}")
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_REASONS:
            return PullState(reason=waiting["reason"],
                             message=f"the pull pod is waiting: {waiting['reason']}: {waiting.get('message') or ''}"
                             .strip().rstrip(":"))
    return None


def pull_state(job: dict, pods: list[dict]) -> PullState:
    conditions = true_conditions(job)
    pods = newest_first(owned(pods, job))
    if "Complete" in conditions:
        result = completed_result(job, pods)
        if result is None:
            return PullState(rerun=True, reason="Pulling", message="the finished pull's result went with its pods; "
                                                                   "running it again (the cache has the files)")
        return PullState(done=True, reason="Pulled", result=result,
                         message=f"{result.get('files')} files, {result.get('bytes')} bytes at commit "
                                 f"{result.get('commit')}" + (" (already in the cache)" if result.get("cached") else ""))
    # Permanent means the puller would only say it again: it stays the answer while the Job's retries run (no
    # podFailurePolicy before Kubernetes 1.26), so Stalled does not flap back to Progressing with each new pod.
    if (recorded := recorded_failure(job)) is not None:
        return recorded
    # The first permanent failure, whatever pods came after it: the answer does not change with the next one.
    failures = (f for f in map(failure_of, reversed(pods)) if f is not None and f.permanent)
    if permanent := next(failures, None):
        return permanent
    if "Failed" in conditions:
        condition = conditions["Failed"]
        detail = next((f for f in map(failure_of, pods) if f is not None), None)
        if detail is not None and detail.reason not in ("PullFailed",):
            return PullState(failed=True, permanent=True, reason=detail.reason,
                             message=f"{detail.message} (the Job failed: {condition.get('reason')})")
        reason = condition.get("reason") or "PullFailed"
        return PullState(failed=True, permanent=True, reason=reason,
                         message=f"the pull Job failed: {reason}: {condition.get('message') or ''}".strip().rstrip(":")
                         + (f"; {detail.message}" if detail else ""))
    if pods:
        newest = pods[0]
        if (failure := failure_of(newest)) is not None:
            return PullState(failed=True, reason="Retrying",
                             message=f"{failure.reason}: {failure.message}; the Job retries")
        if (waiting := waiting_of(newest)) is not None:
            return waiting
    return PullState()
