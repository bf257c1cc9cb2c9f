"""The kopf handlers. Each is small: it calls `reconcile`, which reads the children, builds what is missing with
the pure builders, and writes the status. The same `reconcile` runs when the ModelDeployment changes and when one
of its children does (a pull Job finishing, a Deployment's pods turning ready), so status follows the children."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import kopf
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

from modeldeploy import endpoints
from modeldeploy.api import (GROUP, PLURAL, VERSION, ModelDeploymentSpec, SpecError, name_problems,
                             parse_spec)
from modeldeploy.build.cache import build_cache_pvc
from modeldeploy.build.common import LABEL_MDEP, LABEL_WEIGHTS, pull_job_name, weights_key
from modeldeploy.build.monitoring import POD_MONITOR_API, build_pod_monitor
from modeldeploy.build.pull_job import build_pull_job
from modeldeploy.build.serving import build_deployment, build_service, server_selector
from modeldeploy.config import OperatorConfig
from modeldeploy.pull.sizing import claim_size
from modeldeploy.reconcile import events, metrics
from modeldeploy.reconcile.children import Apis, apply, create_if_absent, last_progress, pull_state, read_or_none
from modeldeploy.reconcile.hub_sizes import PENDING
from modeldeploy.reconcile.status import (AVAILABLE, CACHE_READY, READY, STALLED, WEIGHTS_READY, Observation,
                                          status_patch)

log = logging.getLogger("modeldeploy.operator")
MDEP = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Everything kopf keeps about a resource goes to its status: the operator never writes spec or metadata
    # (no drift for GitOps tools), and deletion never waits on a finalizer.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diffbase")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    # The operator's resources are known in advance: no watching of CRDs and namespaces (least-privilege RBAC).
    settings.scanning.disabled = True
    memo.apis = Apis.create()
    memo.phases = metrics.PhaseBook()
    if not isinstance(getattr(memo, "config", None), OperatorConfig):
        memo.config = OperatorConfig()


# -- indexes: which ModelDeployments a child concerns ----------------------------------------------------------------
@kopf.index(*MDEP)
def by_weights(namespace, name, body, memo, **_):
    key = key_or_none(body, memo.config)
    return {(namespace, key): name} if key else None


@kopf.index(*MDEP)
def by_claim(namespace, name, body, **_):
    spec = parse_or_none(body)
    return {(namespace, spec.cache.claim_name): name} if spec else None


# -- the resource's own handlers --------------------------------------------------------------------------------------
@kopf.on.resume(*MDEP)
@kopf.on.create(*MDEP)
@kopf.on.update(*MDEP, field="spec")
def on_change(body, memo, **_):
    """Retries (kopf's backoff) while something outside the spec may still change; stops on a bad spec."""
    observation = reconcile(body, memo)
    if observation.stalled and observation.stalled[0] == "InvalidSpec":
        raise kopf.PermanentError(observation.stalled[1])
    if observation.retry:
        raise kopf.TemporaryError(observation.retry, delay=observation.retry_delay)


# Download progress lives in the pull pod's log, which makes no events: a background loop refreshes the
# resources that are pulling. (Not a kopf timer: timers put a finalizer on each resource, and a finalizer would
# make deletion hang whenever the operator is not running.)
PROGRESS_INTERVAL = 5.0


@kopf.on.startup()
async def start_progress_refresher(memo: kopf.Memo, **_) -> None:
    memo.refresher = asyncio.get_running_loop().create_task(refresh_pulls_forever(memo))


@kopf.on.cleanup()
async def stop_progress_refresher(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "refresher", None):
        memo.refresher.cancel()


async def refresh_pulls_forever(memo) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        try:
            await asyncio.to_thread(refresh_pulls, memo)
        except Exception:
            log.exception("refreshing pull progress failed")


def refresh_pulls(memo) -> None:
    custom = memo.apis.custom
    namespaces = getattr(memo, "namespaces", None) or [None]
    for namespace in namespaces:
        items = (custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL) if namespace
                 else custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"]
        for item in items:
            if (item.get("status") or {}).get("phase") in ("Pending", "Pulling"):
                reconcile_by_name(memo, item["metadata"]["namespace"], item["metadata"]["name"])


@kopf.on.event(*MDEP)
def on_gone(type, body, namespace, name, memo, **_):
    """Deployment and Service go with the resource (ownerReferences). The cache stays. The shared pull Job goes
    when no other ModelDeployment in the namespace needs the same weights. Seen from the DELETED event: no
    finalizer, so deletion never waits for the operator."""
    if type != "DELETED":
        return
    memo.phases.record(namespace, name, None)
    if (key := key_or_none(body, memo.config)) is None:
        return
    apis: Apis = memo.apis
    for item in apis.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        if key_or_none(item, memo.config) == key:
            return
    job = pull_job_name(parse_spec(dict(body)), key)
    try:
        apis.batch.delete_namespaced_job(job, namespace, propagation_policy="Background")
        log.info("mdep %s/%s: deleted pull job %s (no other user)", namespace, name, job)
    except ApiException as error:
        if error.status != 404:
            raise


# -- children's events --------------------------------------------------------------------------------------------
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_WEIGHTS: kopf.PRESENT})
def on_pull_job(namespace, labels, memo, by_weights: kopf.Index, **_):
    for name in by_weights.get((namespace, labels[LABEL_WEIGHTS]), []):
        reconcile_by_name(memo, namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MDEP: kopf.PRESENT})
def on_deployment(namespace, labels, memo, **_):
    reconcile_by_name(memo, namespace, labels[LABEL_MDEP])


@kopf.on.event("", "v1", "persistentvolumeclaims")
def on_claim(namespace, name, memo, by_claim: kopf.Index, **_):
    for mdep in by_claim.get((namespace, name), []):
        reconcile_by_name(memo, namespace, mdep)


def reconcile_by_name(memo, namespace: str, name: str) -> None:
    """From a child's event or the progress refresher: one ModelDeployment's trouble must not stop the others'."""
    try:
        if (body := read_live(memo.apis, namespace, name)) is not None:
            reconcile(body, memo)
    except Exception:
        log.exception("mdep %s/%s: reconcile (after a child's event, or refreshing progress) failed", namespace, name)


def read_live(apis: Apis, namespace: str, name: str) -> dict | None:
    """The resource as the API server has it now; None once it is gone or being deleted."""
    body = read_or_none(apis.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    return body if body is not None and not body["metadata"].get("deletionTimestamp") else None


def parse_or_none(body) -> ModelDeploymentSpec | None:
    try:
        return parse_spec(dict(body))
    except SpecError:
        return None


def key_or_none(body, config: OperatorConfig) -> str | None:
    """The weights key of a resource that may pull (None for one the operator refuses)."""
    spec = parse_or_none(body)
    if spec is None or spec.problems(config) or name_problems(body["metadata"]["name"]):
        return None
    return weights_key(spec, config)


# -- the reconcile ----------------------------------------------------------------------------------------------------
STALE_READ_ATTEMPTS = 3


class StaleRead(Exception):
    """The resource changed after it was read, so its status was not written over."""


def reconcile(body, memo) -> Observation:
    """Observes the children, writes the status over the version of the resource that was read, and posts an Event
    per transition. Reconciles run concurrently (kopf's workers, the progress refresher), so when something wrote the
    resource in between, the write is refused and the reconcile runs again on a fresh read: an older observation
    never overwrites a newer status, and each transition gets one Event."""
    for _ in range(STALE_READ_ATTEMPTS - 1):
        try:
            return reconcile_as_read(body, memo)
        except StaleRead:
            meta = body["metadata"]
            if (body := read_live(memo.apis, meta["namespace"], meta["name"])) is None:
                return Observation(generation=meta.get("generation", 1))
    return reconcile_as_read(body, memo)    # a third StaleRead reaches the caller: kopf retries, the refresher logs


def reconcile_as_read(body, memo) -> Observation:
    meta = body["metadata"]
    previous = list((body.get("status") or {}).get("conditions") or [])
    observation = Observation(generation=meta.get("generation", 1))
    started, result = time.monotonic(), "error"
    try:
        observe(body, memo.apis, memo.config, observation)
        try:
            status = write_status(memo.apis, body, observation, previous)
        except StaleRead:
            result = "conflict"
            raise
        if status is not None:
            memo.phases.record(meta["namespace"], meta["name"], status["phase"])
            metrics.record_download(meta["namespace"], meta["name"], status.get("download"))
        result = "ok"
    finally:
        if result == "error":   # what was observed before the failure still reaches the status
            with contextlib.suppress(StaleRead):
                write_status(memo.apis, body, observation, previous)
        metrics.RECONCILES.labels(result).inc()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    return observation


def observe(body, apis: Apis, config: OperatorConfig, o: Observation) -> None:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        spec = parse_spec(dict(body))
        problems = name_problems(name) + spec.problems(config)
    except SpecError as error:
        problems = [str(error)]
    if problems:
        o.stalled = ("InvalidSpec", "; ".join(problems))
        return

    if spec.runtime.trust_remote_code:
        o.fields["warnedRemoteCode"] = meta.get("generation")    # write_status warns once per generation

    # 1. the shared cache
    claim = read_or_none(apis.core.read_namespaced_persistent_volume_claim, spec.cache.claim_name, namespace)
    if claim is None:
        size, why = estimated_cache_size(spec, config, apis)
        if size is PENDING:
            o.cache = (False, "Sizing", f"asking the hub for the sizes of {spec.model.id}'s files{why}")
            o.retry, o.retry_delay = o.cache[2], 2
            return
        create_if_absent(apis.core.create_namespaced_persistent_volume_claim, namespace,
                         build_cache_pvc(spec, config, size))
        o.cache = (False, "Creating", f"creating PVC {spec.cache.claim_name}{why}")
        o.retry = o.cache[2]
        return
    o.fields["cache"] = {"claimName": spec.cache.claim_name,
                         "capacity": (claim.status.capacity or {}).get("storage") if claim.status else None}
    if claim.status.phase != "Bound":
        why = latest_event(apis, namespace, "PersistentVolumeClaim", spec.cache.claim_name)
        o.cache = (False, "ClaimPending", f"PVC {spec.cache.claim_name} is {claim.status.phase}"
                   + (f": {why}" if why else ""))
        o.retry = o.cache[2]
        return
    o.cache = (True, "Bound", f"PVC {spec.cache.claim_name} is bound ({o.fields['cache']['capacity']})")

    # 2. the weights. The operator never reads the token Secret: the pull pod gets it through secretKeyRef, and a
    # missing one shows as the pod's CreateContainerConfigError, which the pull state names.
    key = weights_key(spec, config)
    job_name = pull_job_name(spec, key)
    o.fields.update(weightsKey=key)
    job = read_or_none(apis.batch.read_namespaced_job, job_name, namespace)
    if job is None:
        too_small = cache_too_small(spec, config, apis, o.fields["cache"]["capacity"])
        if too_small is PENDING:
            o.weights = (False, "Sizing", f"asking the hub for the sizes of {spec.model.id}'s files")
            o.retry, o.retry_delay = o.weights[2], 2
            return
        if too_small:
            o.weights = (False, "NoSpace", too_small)
            o.stalled = ("NoSpace", too_small)
            return
        if create_if_absent(apis.batch.create_namespaced_job, namespace, build_pull_job(spec, config, key)):
            events.info(apis.core, body, "PullStarted",
                        f"pull job {job_name} created for {spec.model.id}@{spec.model.revision}")
            log.info("mdep %s/%s: pull job %s created for %s@%s", namespace, name, job_name, spec.model.id,
                     spec.model.revision)
        o.weights = (False, "Pulling", f"pull job {job_name} started")
        o.fields["download"] = {"job": job_name}
        return
    state = pull_state(apis, namespace, job)
    o.fields["download"] = {"job": job_name}
    if not state.done:
        if state.permanent:
            o.weights = (False, state.reason, state.message)
            o.stalled = (state.reason, f"pull job {job_name}: {state.message}")
            return
        progress = last_progress(apis, namespace, job_name)
        if progress:
            o.fields["download"].update(progress)
        o.weights = (False, state.reason, state.message)
        return
    commit = state.result["commit"]
    o.fields.update(resolvedRevision=commit)
    o.fields["download"].update(bytes=state.result["bytes"], totalBytes=state.result["bytes"],
                                files=state.result["files"], bytesPerSecond=None, etaSeconds=None)  # None: removed
    o.weights = (True, "Pulled", state.message)

    # 3. serving
    deployment = build_deployment(name, spec, config, commit)
    service = build_service(name, spec)
    for child in (deployment, service):
        kopf.adopt(child, owner=dict(body))
    apply(apis.apps.read_namespaced_deployment, apis.apps.create_namespaced_deployment,
          apis.apps.patch_namespaced_deployment, namespace, deployment)
    apply(apis.core.read_namespaced_service, apis.core.create_namespaced_service,
          apis.core.patch_namespaced_service, namespace, service)
    if spec.monitoring.enabled and config.monitoring.pod_monitors == "auto" and pod_monitors_exist(
            apis, config.monitoring.discovery_interval_seconds):
        pod_monitor = build_pod_monitor(name)
        kopf.adopt(pod_monitor, owner=dict(body))
        group, version, plural = POD_MONITOR_API
        apply(lambda n, ns: apis.custom.get_namespaced_custom_object(group, version, ns, plural, n),
              lambda ns, b: apis.custom.create_namespaced_custom_object(group, version, ns, plural, b),
              lambda n, ns, b: apis.custom.patch_namespaced_custom_object(group, version, ns, plural, n, b),
              namespace, pod_monitor)
    live = apis.apps.read_namespaced_deployment(name, namespace)
    ready = live.status.ready_replicas or 0
    wanted = spec.replicas
    current = (live.status.observed_generation or 0) >= live.metadata.generation and \
        (live.status.updated_replicas or 0) >= wanted
    o.fields.update(replicas=live.status.replicas or 0, readyReplicas=ready, readyText=f"{ready}/{wanted}",
                    selector=",".join(f"{k}={v}" for k, v in server_selector(name).items()),
                    endpoint=f"http://{name}.{namespace}.svc:{spec.service.port}")
    if current and ready >= wanted:
        o.available = (True, "ReplicasReady", f"{ready}/{wanted} replicas ready")
    else:
        o.available = (False, "RollingOut" if not current else "ReplicasNotReady",
                       f"{ready}/{wanted} replicas ready" + pod_problem(apis, namespace, name))


def cache_too_small(spec, config: OperatorConfig, apis: Apis, capacity: str | None):
    """Before a pull: a message when the hub lists more bytes for the selected files than the cache PVC holds in
    all (what other models already use there is the puller's own check, on the mounted volume); PENDING while the
    hub is being asked."""
    if not capacity:
        return None
    needed = hub_listed_bytes(spec, config, apis)
    if needed is PENDING or needed is None:
        return needed
    holds = int(parse_quantity(capacity))
    if needed <= holds:
        return None
    return (f"the cache PVC {spec.cache.claim_name} holds {capacity} but the hub lists {needed / 2**20:.0f} MiB for "
            f"{spec.model.id}'s selected files: use a larger cache (spec.cache) or fewer files (spec.model.files)")


def hub_listed_bytes(spec, config: OperatorConfig, apis: Apis):
    """What the first endpoint of the pull lists, asked without a token (a gated repository's sizes stay unknown:
    the pull pod, which holds the token, checks space itself)."""
    model = spec.model
    return apis.hub_sizes.selected_bytes(endpoints.pull_endpoints(spec, config)[0], model.id, model.revision,
                                         model.files, model.allow_pickle)


def estimated_cache_size(spec, config: OperatorConfig, apis: Apis):
    """For a PVC the user did not size: the selected files' sizes as the hub lists them, with headroom; the
    configured default when the hub does not tell; PENDING while it is being asked."""
    if spec.cache.size:
        return None, ""
    nbytes = hub_listed_bytes(spec, config, apis)
    if nbytes is PENDING:
        return PENDING, ""
    if nbytes is None:
        return None, f" ({config.cache.size}, the default: the hub did not list the files' sizes)"
    size = claim_size(nbytes)
    return size, f" ({size}: the hub lists {nbytes / 2**20:.0f} MiB for the selected files)"


def pod_monitors_exist(apis: Apis, interval: float) -> bool:
    """Whether the Prometheus Operator's PodMonitor kind is served (API discovery, looked up again after
    `interval` seconds)."""
    now = time.monotonic()
    if apis.pod_monitors_checked is None or now - apis.pod_monitors_checked[0] > interval:
        group, version, plural = POD_MONITOR_API
        try:
            resources = apis.custom.get_api_resources(group, version).resources
            found = any(r.name == plural for r in resources)
        except ApiException as error:
            if error.status != 404:
                raise
            found = False
        apis.pod_monitors_checked = (now, found)
    return apis.pod_monitors_checked[1]


def pod_problem(apis: Apis, namespace: str, name: str) -> str:
    selector = ",".join(f"{k}={v}" for k, v in server_selector(name).items())
    for pod in apis.core.list_namespaced_pod(namespace, label_selector=selector).items:
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting and waiting.reason not in ("ContainerCreating", "PodInitializing"):
                return f"; {pod.metadata.name} {status.name}: {waiting.reason}"
    return ""


def latest_event(apis: Apis, namespace: str, kind: str, name: str) -> str | None:
    found = apis.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}").items
    found.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
    return found[-1].message if found else None


PROGRESS_REASONS = {"Waiting", "Creating", "Sizing", "Pulling", "RollingOut", "ReplicasNotReady", "Ready", "Progressing"}


def write_status(apis: Apis, body, observation: Observation, previous: list[dict]) -> dict | None:
    status, changed = status_patch(observation, previous)
    meta = body["metadata"]
    try:   # resourceVersion: a precondition, the write is refused (409) if the resource changed since it was read
        apis.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
            {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status})
    except ApiException as error:
        if error.status == 404:
            return None   # deleted meanwhile
        if error.status == 409:
            raise StaleRead() from error
        raise
    warned = status.get("warnedRemoteCode")
    if warned is not None and (body.get("status") or {}).get("warnedRemoteCode") != warned:
        events.warn(apis.core, body, "TrustRemoteCode", "runtime.trustRemoteCode is on: the model's own Python code "
                                                        "will run in the serving pods")
    # One Event per transition that a person wants to see: a step done, a failure, a stall. A stall turns both
    # Stalled and the step's own condition, with one reason: one Event for both.
    to_post: dict[tuple[str, str], str] = {}
    for condition, _old in changed:
        kind, ok, reason = condition["type"], condition["status"] == "True", condition["reason"]
        if kind == STALLED and ok:
            to_post.setdefault(("Warning", reason), condition["message"])
            if observation.weights is not None and not observation.weights[0]:
                metrics.PULL_FAILURES.labels(reason).inc()
        elif kind in (CACHE_READY, WEIGHTS_READY, AVAILABLE, READY) and ok:
            to_post.setdefault(("Normal", kind), condition["message"])
        elif kind in (CACHE_READY, WEIGHTS_READY, AVAILABLE) and reason not in PROGRESS_REASONS:
            to_post.setdefault(("Warning", reason), condition["message"])
    for (type_, reason), message in to_post.items():
        events.post(apis.core, body, type_, reason, message)
    return status
