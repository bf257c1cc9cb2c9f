"""Reading and writing a ModelDeployment's children through the Kubernetes API: create-or-update with
deterministic names (so every step is idempotent and a retry never duplicates), and what each child says."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.rest import ApiException

from modeldeploy.pull.errors import EXIT_NO_SPACE, EXIT_PERMANENT, Reason
from modeldeploy.reconcile.hub_sizes import HubSizes


@dataclass
class Apis:
    core: client.CoreV1Api
    batch: client.BatchV1Api
    apps: client.AppsV1Api
    custom: client.CustomObjectsApi
    pod_monitors_checked: tuple[float, bool] | None = None   # (when, whether the PodMonitor kind exists)
    hub_sizes: HubSizes = field(default_factory=HubSizes)

    @classmethod
    def create(cls, api: client.ApiClient | None = None) -> "Apis":
        api = api or client.ApiClient()
        return cls(client.CoreV1Api(api), client.BatchV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api))


def read_or_none(read, *args):
    try:
        return read(*args)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def create_if_absent(create, namespace: str, body: dict) -> bool:
    """True when created; False when it already existed (another ModelDeployment, or an earlier try, made it)."""
    try:
        create(namespace, body)
        return True
    except ApiException as error:
        if error.status == 409:
            return False
        raise


def apply(read, create, patch, namespace: str, body: dict) -> None:
    """Creates, or brings an existing object to `body` (a merge patch: our fields win, others' stay)."""
    name = body["metadata"]["name"]
    if read_or_none(read, name, namespace) is None and create_if_absent(create, namespace, body):
        return
    patch(name, namespace, body)


# -- what the pull Job says ------------------------------------------------------------------------------------------
@dataclass
class PullState:
    done: bool = False
    failed: bool = False
    permanent: bool = False
    reason: str = "Pulling"
    message: str = ""
    result: dict | None = None        # the puller's final JSON line
    progress: dict | None = None      # its last progress line


def job_pods(apis: Apis, namespace: str, job_name: str) -> list:
    return apis.core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items


def final_line(pod) -> tuple[dict | None, object]:
    for status in pod.status.container_statuses or []:
        terminated = status.state.terminated if status.state else None
        if terminated is not None:
            try:
                return json.loads(terminated.message or ""), terminated
            except ValueError:
                return None, terminated
    return None, None


def pull_state(apis: Apis, namespace: str, job) -> PullState:
    pods = sorted(job_pods(apis, namespace, job.metadata.name), key=lambda p: p.metadata.creation_timestamp)
    for pod in pods:
        result, terminated = final_line(pod)
        if terminated is not None and terminated.exit_code == 0 and result and result.get("event") == "complete":
            return PullState(done=True, reason="Pulled", result=result,
                             message=f"{result['files']} files, {result['bytes']} bytes at commit {result['commit']}"
                                     + (" (already in the cache)" if result.get("cached") else ""))
    state = PullState()
    for pod in reversed(pods):   # the newest failure explains best
        result, terminated = final_line(pod)
        if terminated is None:
            continue
        if terminated.reason == "OOMKilled":
            return PullState(failed=True, reason="OOMKilled", message="the pull pod ran out of memory")
        if result and result.get("event") == "failed":
            reason = result.get("reason", "PullFailed")
            permanent = terminated.exit_code in (EXIT_PERMANENT, EXIT_NO_SPACE) or reason == Reason.NO_SPACE.value
            state = PullState(failed=True, permanent=permanent, reason=reason, message=result.get("message", ""))
            break
        state = PullState(failed=True, reason="PullFailed", message=f"the pull pod exited with {terminated.exit_code}")
        break
    for condition in job.status.conditions or []:
        if condition.type == "Failed" and condition.status == "True":
            state.failed, state.permanent = True, True
            if state.reason in ("Pulling", "PullFailed") and condition.reason == "DeadlineExceeded":
                state.reason, state.message = "DeadlineExceeded", "the pull Job ran past its deadline"
            state.message = state.message or f"the pull Job failed: {condition.reason}: {condition.message}"
            return state
    if state.failed and not state.permanent:
        state.reason, state.message = "Retrying", f"{state.reason}: {state.message}; the Job retries"
    if not state.failed:
        waiting = next((s.state.waiting for p in pods for s in p.status.container_statuses or []
                        if s.state and s.state.waiting and s.state.waiting.reason not in ("ContainerCreating",)), None)
        if waiting is not None:
            state.message = f"the pull pod is waiting: {waiting.reason}: {waiting.message or ''}".strip()
            state.reason = waiting.reason if waiting.reason in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull",
                                                                 "CreateContainerConfigError") else "Pulling"
        else:
            state.message = "pulling the weights into the cache"
    return state


def last_progress(apis: Apis, namespace: str, job_name: str) -> dict | None:
    """The puller's last progress line, from the running pod's log: the pull pod holds no API token, the operator
    reads what it prints."""
    for pod in job_pods(apis, namespace, job_name):
        if pod.status.phase != "Running":
            continue
        try:
            tail = apis.core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=5)
        except ApiException:
            continue
        for line in reversed(tail.splitlines()):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "progress":
                return {"bytes": event.get("bytes"), "totalBytes": event.get("total"),
                        "bytesPerSecond": event.get("rate"), "etaSeconds": event.get("eta_seconds")}
    return None
