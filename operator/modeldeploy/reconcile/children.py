"""Reading and writing a ModelDeployment's children through the Kubernetes API. Children are written with
server-side apply (field manager `modeldeploy`): one request creates or updates, and a field the operator stops
setting (an old engine's command, a removed sidecar or port) is removed. Reads come back as plain dicts, as the
API serves them, so the decisions made on them are pure and unit-tested over recorded objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.rest import ApiException

from modeldeploy.reconcile import metrics
from modeldeploy.api import GROUP, PLURAL, VERSION
from modeldeploy.manifests.common import LABEL_CACHE
from modeldeploy.reconcile.hub_sizes import HubSizes
from modeldeploy.reconcile.views import CLAIMS, MDEPS, PRUNE_JOBS, PULL_JOBS, PULL_PODS, Views

FIELD_MANAGER = "modeldeploy"
REQUEST_TIMEOUT = (10, 60)     # seconds: to connect, then to read the answer


@dataclass
class Apis:
    api: client.ApiClient
    core: client.CoreV1Api
    batch: client.BatchV1Api
    apps: client.AppsV1Api
    custom: client.CustomObjectsApi
    pod_monitors_checked: tuple[float, bool] | None = None   # (when, whether the PodMonitor kind exists)
    hub_sizes: HubSizes = field(default_factory=HubSizes)
    views: Views | None = None        # kopf's indexes, once the handlers have them
    latest_events: dict = field(default_factory=dict)        # (namespace, kind, name) -> (when, message)
    # (namespace, name) -> (resourceVersion written over, the resource as written): what the views show a moment late
    written: dict = field(default_factory=dict)
    # UIDs the API server no longer has but a view may still show: kopf keeps index entries of objects deleted while
    # its watch was down (a re-list after 410 Gone adds and updates, it never removes)
    gone: set = field(default_factory=set)

    @classmethod
    def create(cls, api: client.ApiClient | None = None) -> "Apis":
        api = api or CountingClient()
        return cls(api, client.CoreV1Api(api), client.BatchV1Api(api), client.AppsV1Api(api),
                   client.CustomObjectsApi(api))

    def plain(self, obj) -> dict | list | None:
        """A client model object as the API serves it (camelCase dict)."""
        return self.api.sanitize_for_serialization(obj)


class CountingClient(client.ApiClient):
    """The API client, counting its requests (modeldeploy_operator_api_requests_total): what the operator costs the
    API server, beside kopf's watches, is measured, not guessed."""

    def call_api(self, method, *args, **kwargs):
        metrics.API_REQUESTS.labels(method).inc()
        # Never an unbounded wait: a request lost on a half-open connection (an API server fail-over) would hold
        # a worker, and whatever waits on it, for ever.
        if kwargs.get("_request_timeout") is None:      # the generated methods pass None when not given one
            kwargs["_request_timeout"] = REQUEST_TIMEOUT
        return super().call_api(method, *args, **kwargs)


class Refused(Exception):
    """The API server refused a child as built (invalid): the spec cannot be served as it is."""


def read_or_none(read, *args, **kwargs):
    try:
        return read(*args, **kwargs)
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


def apply(patch, namespace: str, body: dict, replace=None):
    """Server-side apply of `body`: the object as the operator wants it, nothing else of the operator's kept.
    Refused (with the API server's message) when the object is invalid.

    `replace`: for objects whose merge older API servers get wrong. Before Kubernetes 1.22, applying a probe with
    another handler (tcpSocket for httpGet) leaves an empty httpGet behind and the result is refused; a refused apply
    of such an object is then made as a whole update, which holds exactly what the operator built."""
    name = body["metadata"]["name"]
    for attempt in range(2):
        try:
            return patch(name, namespace, body, field_manager=FIELD_MANAGER, force=True,
                         _content_type="application/apply-patch+yaml")
        except ApiException as error:
            if error.status == 409 and attempt == 0:     # two reconciles created it at once: apply over it
                continue
            if error.status not in (400, 422):
                raise
            refusal = api_message(error)
        if replace is None:
            break
        try:
            return replace(name, namespace, body, field_manager=FIELD_MANAGER)
        except ApiException as error:
            if error.status not in (400, 404, 422):     # 404: it never existed; the apply's refusal says why
                raise
            if error.status != 404:
                refusal = api_message(error)
            break
    raise Refused(f"{body['kind']} {name}: {refusal}")


def api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message") or error.reason
    except (TypeError, ValueError, AttributeError):
        return str(error.reason)


def pods_of(apis: Apis, namespace: str, selector: str) -> list[dict]:
    return apis.plain(apis.core.list_namespaced_pod(namespace, label_selector=selector).items)


# -- reads through the views where kopf has them (views.py), else from the API server ---------------------------------
def read_mdep(apis: Apis, namespace: str, name: str, fresh: bool = False) -> dict | None:
    seen = apis.views.one(MDEPS, (namespace, name)) if apis.views else None
    if seen is not None and seen["metadata"].get("uid") in apis.gone:
        seen = None
    if apis.views and not fresh:
        over, written = apis.written.get((namespace, name), (None, None))
        if seen is not None and written is not None and seen["metadata"]["resourceVersion"] == over:
            return written        # the view still shows the version the operator's last status write replaced
        apis.written.pop((namespace, name), None)
        return seen
    live = read_or_none(apis.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    if live is None and seen is not None:
        went(apis, seen)
    return live


def went(apis: Apis, body: dict) -> None:
    """The API server says this resource is gone while the view still has it: the view is not read for it again."""
    apis.gone.add(body["metadata"].get("uid"))
    apis.written.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)


def wrote_status(apis: Apis, over: dict, written: dict) -> None:
    """A status write's result, read in place of `over` until the watch brings it (or something newer): a child's
    event in between then sees the status as written, not a stale one that would be written again and refused."""
    if apis.views:
        meta = over["metadata"]
        apis.written[(meta["namespace"], meta["name"])] = (meta["resourceVersion"], written)


def read_claim(apis: Apis, namespace: str, name: str) -> dict | None:
    if apis.views:
        return apis.views.one(CLAIMS, (namespace, name))
    return apis.plain(read_or_none(apis.core.read_namespaced_persistent_volume_claim, name, namespace))


def read_pull_job(apis: Apis, namespace: str, name: str) -> dict | None:
    if apis.views:
        return apis.views.one(PULL_JOBS, (namespace, name))
    return apis.plain(read_or_none(apis.batch.read_namespaced_job, name, namespace))


def pull_pods(apis: Apis, namespace: str, job_name: str) -> list[dict]:
    if apis.views:
        return apis.views.values(PULL_PODS, (namespace, job_name))
    return pods_of(apis, namespace, f"job-name={job_name}")


def prune_jobs(apis: Apis, namespace: str, claim: str) -> list[dict]:
    if apis.views:
        return apis.views.values(PRUNE_JOBS, (namespace, claim))
    return apis.plain(apis.batch.list_namespaced_job(
        namespace, label_selector=f"app.kubernetes.io/component=prune,{LABEL_CACHE}={claim}").items)


def last_progress(apis: Apis, namespace: str, pods: list[dict]) -> dict | None:
    """The puller's last progress line, from the running pod's log: the pull pod holds no API token, the operator
    reads what it prints."""
    for pod in pods:
        if (pod.get("status") or {}).get("phase") != "Running":
            continue
        try:
            tail = apis.core.read_namespaced_pod_log(pod["metadata"]["name"], namespace, tail_lines=5)
        except ApiException:
            continue
        for line in reversed(tail.splitlines()):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "progress":
                return {"bytes": event.get("bytes"), "totalBytes": event.get("total"),
                        "bytesPerSecond": event.get("rate"), "etaSeconds": event.get("eta_seconds")}
    return None


def server_problem(pods: list[dict]) -> str:
    """Why serving pods are not ready, in the scheduler's or the kubelet's words ('' when nothing is wrong yet)."""
    for pod in pods:
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition["type"] == "PodScheduled" and condition.get("status") == "False" and \
                    condition.get("reason") == "Unschedulable":
                return f"; {pod['metadata']['name']} cannot be scheduled: {condition.get('message')}"
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in ("ContainerCreating", "PodInitializing"):
                return f"; {pod['metadata']['name']} {container['name']}: {waiting['reason']}" + (
                    f": {waiting['message']}" if waiting.get("message") else "")
    return ""
