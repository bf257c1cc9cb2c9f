"""The reconcile, step by step: the spec, the cache, the weights, serving. Each step reads what it needs, makes what
is missing with the pure builders, records what it found on the Observation, and says whether the next step may run.
Level-triggered: every step works from the objects as they are now, so a reconcile after any event (or after the
operator was down) reaches the same result."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import kopf
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

from modeldeploy import endpoints
from modeldeploy.api import ModelDeploymentSpec, SpecError, name_problems, parse_spec
from modeldeploy.manifests.cache import build_cache_pvc
from modeldeploy.manifests.common import ANNOTATION_MODEL, pull_job_name, weights_key
from modeldeploy.manifests.monitoring import POD_MONITOR_API, build_pod_monitor
from modeldeploy.manifests.pull_job import build_pull_job
from modeldeploy.manifests.serving import build_deployment, build_service, server_selector
from modeldeploy.config import OperatorConfig
from modeldeploy.pull.selection import served_gguf
from modeldeploy.pull.sizing import claim_size
from modeldeploy.reconcile import events, garbage
from modeldeploy.reconcile.children import (Apis, Refused, apply, create_if_absent, last_progress, pods_of,
                                            prune_jobs, pull_pods, read_claim, read_mdep, read_or_none, read_pull_job,
                                            server_problem)
from modeldeploy.reconcile.hub_sizes import PENDING, Query
from modeldeploy.reconcile.pull_state import (RESULT_ANNOTATION, PullState, pull_state, recorded_line,
                                              true_conditions)
from modeldeploy.reconcile.status import Observation, StaleRead
from modeldeploy.reconcile.views import BY_CLAIM

log = logging.getLogger("modeldeploy.operator")
# How long a reconcile waits for a hub's listing before it says "Sizing" and looks again later: a reachable hub
# answers within it (no status write and retry for nothing); a hanging one holds a worker no longer than this.
HUB_ANSWER_SECONDS = 1.0
EVENT_SECONDS = 4.0


def observe(body, apis: Apis, config: OperatorConfig, o: Observation) -> None:
    spec = valid_spec(body, config, o)
    users = cache_users(apis, body["metadata"]["namespace"], spec.cache.claim_name) if spec else []
    if spec is None or not cache_step(body, spec, apis, config, o, users):
        return
    pulled = weights_step(body, spec, apis, config, o)
    if pulled is not None:
        serving_step(body, spec, apis, config, o, *pulled)


def valid_spec(body, config: OperatorConfig, o: Observation) -> ModelDeploymentSpec | None:
    meta = body["metadata"]
    try:
        spec = parse_spec(dict(body))
        problems = name_problems(meta["name"]) + spec.problems(config)
    except SpecError as error:
        problems = [str(error)]
    if problems:
        o.stalled = ("InvalidSpec", "; ".join(problems))
        return None
    if spec.runtime.trust_remote_code:
        o.fields["warnedRemoteCode"] = meta.get("generation")    # write_status warns once per generation
    return spec


# -- 1. the shared cache ----------------------------------------------------------------------------------------------
def cache_step(body, spec: ModelDeploymentSpec, apis: Apis, config: OperatorConfig, o: Observation,
               users: list[CacheUser]) -> bool:
    """The PVC exists (bound or not: with WaitForFirstConsumer the pull pod is what binds it) and, once bound, is
    large enough for the weights its ModelDeployments need, expanded where the StorageClass allows."""
    namespace, claim_name = body["metadata"]["namespace"], spec.cache.claim_name
    claim = read_claim(apis, namespace, claim_name)
    if claim is None:
        size, why = estimated_cache_size(spec, config, apis)
        if size is PENDING:
            o.cache = (False, "Sizing", f"asking the hub for the sizes of {spec.model.id}'s files")
            o.retry, o.retry_delay = o.cache[2], 2
            return False
        wanted = build_cache_pvc(spec, config, size)
        try:
            claim = apis.plain(apis.core.create_namespaced_persistent_volume_claim(namespace, wanted))
        except ApiException as error:
            if error.status != 409:
                raise       # made by another resource a moment ago (the view had not seen it yet)
            claim = apis.plain(read_or_none(apis.core.read_namespaced_persistent_volume_claim, claim_name, namespace))
        if claim is None:
            o.cache = (False, "Creating", f"creating PVC {claim_name}{why}")
            o.retry = o.cache[2]
            return False
    capacity = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
    o.fields["cache"] = {"claimName": claim_name, "capacity": capacity}
    if (claim.get("status") or {}).get("phase") != "Bound":
        why = latest_event(apis, namespace, "PersistentVolumeClaim", claim_name) or ""
        reason = "WaitingForFirstConsumer" if "first consumer" in why else "ClaimPending"
        o.cache = (False, reason, f"PVC {claim_name} is {(claim.get('status') or {}).get('phase')}"
                   + (f": {why}" if why else "") + ("; the pull pod will bind it" if reason != "ClaimPending" else ""))
        if reason == "WaitingForFirstConsumer":
            return True     # the pull Job may start: it is the first consumer the claim waits for
        # Binding at once: a pull may start (its pod waits for the volume) if the size asked for covers the weights.
        needed = cache_needs(users, config, apis, spec)
        if needed is not PENDING and (needed or 0) <= parse_quantity(claim["spec"]["resources"]["requests"]["storage"]):
            return True
        o.retry, o.retry_delay = o.cache[2], 5     # else its size is checked, and grown, once it is bound
        return False
    requested = claim["spec"]["resources"]["requests"]["storage"]
    conditions = {c["type"] for c in (claim.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    # FileSystemResizePending: the volume grew, its filesystem grows when a pod mounts it (the pull will).
    if parse_quantity(capacity or "0") < parse_quantity(requested) and "FileSystemResizePending" not in conditions:
        message = f"PVC {claim_name} is being expanded from {capacity} to {requested}"
        if pulled_already(body, spec, config):    # serving goes on while the cache grows for another model
            o.cache = (True, "Bound", f"{message}; this model's weights are in")
            return True
        o.cache = (False, "Expanding", message)
        o.retry, o.retry_delay = o.cache[2], 5
        return False
    needed = cache_needs(users, config, apis, spec)
    if needed is PENDING:
        o.cache = (False, "Sizing", f"asking the hub for the sizes of the models in PVC {claim_name}")
        o.retry, o.retry_delay = o.cache[2], 2
        return False
    if needed and needed > parse_quantity(capacity):
        return expand(body, spec, apis, config, o, claim, capacity, needed)
    o.cache = (True, "Bound", f"PVC {claim_name} is bound ({capacity})")
    return True


def pinned(body, key: str) -> str | None:
    """The ORG/NAME@COMMIT this resource's weights key was pulled at, if it was (status.pin: durable, and cleared
    by nothing but a pull of another key)."""
    pin = (body.get("status") or {}).get("pin") or {}
    return pin.get("snapshot") if pin.get("weightsKey") == key else None


def pulled_already(body, spec: ModelDeploymentSpec, config: OperatorConfig) -> bool:
    return pinned(body, weights_key(spec, config)) is not None


def expand(body, spec: ModelDeploymentSpec, apis: Apis, config: OperatorConfig, o: Observation, claim: dict,
           capacity: str, needed: int) -> bool:
    """More weights than room: ask for a larger claim. The API server refuses where the StorageClass does not allow
    expansion; then the resource stops with the numbers."""
    size = claim_size(needed)
    try:
        apis.core.patch_namespaced_persistent_volume_claim(
            claim["metadata"]["name"], body["metadata"]["namespace"],
            {"spec": {"resources": {"requests": {"storage": size}}}})
    except ApiException as error:
        if error.status not in (403, 422):
            raise
        message = (f"the cache PVC {claim['metadata']['name']} holds {capacity} but its models need "
                   f"{needed / 2**30:.2f} GiB and it cannot be expanded ({error.reason}): use a larger or another "
                   f"cache (spec.cache) or fewer files (spec.model.files)")
        if pulled_already(body, spec, config):    # this model's weights are in: it keeps serving
            o.cache = (True, "Bound", f"PVC {claim['metadata']['name']} is bound ({capacity}); {message}")
            return True
        o.cache = (False, "NoSpace", message)
        o.stalled = ("NoSpace", message)
        return False
    events.info(apis.core, body, "CacheExpanding",
                f"PVC {claim['metadata']['name']}: {capacity} -> {size} for {needed / 2**30:.2f} GiB of weights")
    message = f"PVC {claim['metadata']['name']} is being expanded from {capacity} to {size}"
    o.retry, o.retry_delay = message, 5
    if pulled_already(body, spec, config):
        o.cache = (True, "Bound", f"{message}; this model's weights are in")
        return True
    o.cache = (False, "Expanding", message)
    return False


@dataclass(frozen=True)
class CacheUser:
    """A ModelDeployment on a cache, as its index entry keeps it: what sizing the cache asks of it is worked out once
    per change of the resource, not once per reconcile of every other resource on the cache."""
    spec: ModelDeploymentSpec
    key: str              # its weights key
    query: Query          # what the hub is asked for the sizes of its files


def cache_users(apis: Apis, namespace: str, claim: str) -> list[CacheUser]:
    """Every ModelDeployment on that cache, from kopf's index (none known without it: only the resource's own
    weights then size the cache)."""
    if apis.views is None:
        return []
    return [user for _, user in apis.views.values(BY_CLAIM, (namespace, claim)) if user is not None]


def cache_user(spec: ModelDeploymentSpec, config: OperatorConfig) -> CacheUser | None:
    """None for a spec this operator refuses (another tenant's may name an endpoint the admin did not allow: that
    endpoint is never asked)."""
    if spec.problems(config):
        return None
    return CacheUser(spec, weights_key(spec, config), hub_query(spec, config))


def cache_needs(users: list[CacheUser], config: OperatorConfig, apis: Apis, own: ModelDeploymentSpec):
    """Bytes that the weights of every ModelDeployment using this cache need, as the hubs list them; PENDING while
    the hub is asked about `own`'s. Another resource's weights the hub has not told yet count 0 (their lookup
    is started, not awaited: their own reconcile waits for it, and grows the cache if they need it)."""
    nbytes = hub_listed_bytes(own, config, apis)
    if nbytes is PENDING:
        return PENDING
    total, counted = nbytes or 0, {weights_key(own, config)}
    for user in users:
        if user.key not in counted:
            counted.add(user.key)
            if (nbytes := apis.hub_sizes.ask(user.query)) is not PENDING:
                total += nbytes or 0
    return total


def hub_listed_bytes(spec: ModelDeploymentSpec, config: OperatorConfig, apis: Apis,
                     wait: float = HUB_ANSWER_SECONDS):
    """What the pull's first endpoint lists, asked without a token (a gated repository's sizes stay unknown: the
    pull pod, which holds the token, checks space itself)."""
    return apis.hub_sizes.ask(hub_query(spec, config), wait)


def hub_query(spec: ModelDeploymentSpec, config: OperatorConfig) -> Query:
    """The files the pull will select, asked of its first endpoint."""
    model = spec.model
    return Query(endpoints.pull_endpoints(spec, config)[0], model.id, model.revision,
                 tuple(model.files) if model.files else None, model.allow_pickle, spec.runtime.engine == "llamacpp")


def estimated_cache_size(spec: ModelDeploymentSpec, config: OperatorConfig, apis: Apis):
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


def latest_event(apis: Apis, namespace: str, kind: str, name: str) -> str | None:
    """The newest Event's message about an object, asked at most every EVENT_SECONDS per object: every
    ModelDeployment on a pending claim asks about the same claim."""
    key, now = (namespace, kind, name), time.monotonic()
    if (known := apis.latest_events.get(key)) is not None and now - known[0] < EVENT_SECONDS:
        return known[1]
    found = apis.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}").items
    found.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
    message = found[-1].message if found else None
    if len(apis.latest_events) > 10000:
        apis.latest_events.clear()
    apis.latest_events[key] = (now, message)
    return message


# -- 2. the weights ---------------------------------------------------------------------------------------------------
def weights_step(body, spec: ModelDeploymentSpec, apis: Apis, config: OperatorConfig,
                 o: Observation) -> tuple[str, str | None] | None:
    """The pull Job of this resource's weights key: created when absent, read when there. Once pulled: the commit
    and the .gguf file llama.cpp would load (None: none pulled).
    The operator never reads the token Secret: the pull pod gets it through secretKeyRef, and a missing one shows as
    the pod's CreateContainerConfigError, which the pull state names."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    key = weights_key(spec, config)
    job_name = pull_job_name(spec, key)
    o.fields.update(weightsKey=key, download={"job": job_name})
    job = read_pull_job(apis, namespace, job_name)
    if job is None:
        too_small = cache_too_small(spec, config, apis, o.fields["cache"]["capacity"])
        if too_small is PENDING:
            o.weights = (False, "Sizing", f"asking the hub for the sizes of {spec.model.id}'s files")
            o.retry, o.retry_delay = o.weights[2], 2
            return None
        if too_small:
            o.weights = (False, "NoSpace", too_small)
            o.stalled = ("NoSpace", too_small)
            return None
        if pruning := prune_running(apis, namespace, spec):
            o.weights = (False, "Pruning", f"waiting for {pruning} to finish taking this model out of the cache")
            o.retry, o.retry_delay = o.weights[2], 5
            return None
        # A branch resolved once stays pinned until the spec changes: a re-created Job pulls that commit again.
        commit = (pinned(body, key) or "").rpartition("@")[2] or None
        if create_if_absent(apis.batch.create_namespaced_job, namespace, build_pull_job(spec, config, key, commit)):
            log.info("mdep %s/%s: pull job %s created for %s@%s", namespace, name, job_name, spec.model.id,
                     commit or spec.model.revision)
            if not still_pulls(apis, config, body, key):
                # A read older than the resource (a lagging view; a reconcile that began before a change or the
                # deletion) made a Job whose release may have run already: it goes now, and the reconcile runs again
                # on a fresh read.
                garbage.collect(apis, config, namespace, prune=False)
                raise StaleRead()
        o.weights = (False, "Pulling", PullState().message)     # as the Job will say until its pod runs
        return None
    pods = pull_pods(apis, namespace, job_name)
    state = pull_state(job, pods)
    if state.rerun:
        # The view may still show a Job deleted a moment ago: gone is what was wanted.
        read_or_none(apis.batch.delete_namespaced_job, job_name, namespace, propagation_policy="Background")
        o.weights = (False, state.reason, state.message)
        o.retry, o.retry_delay = state.message, 2
        return None
    if not state.done:
        o.weights = (False, state.reason, state.message)
        if state.permanent:
            o.stalled = (state.reason, f"pull job {job_name}: {state.message}")
            if state.result is not None:
                remember_result(apis, job, state.result)
        else:
            o.progress_in_log = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
            if o.progress_in_log and (progress := last_progress(apis, namespace, pods)):
                o.fields["download"].update(progress)
        return None
    remember_result(apis, job, state.result)
    commit = state.result["commit"]
    snapshot = f"{spec.model.id}@{commit}"
    o.fields.update(resolvedRevision=commit, pin={"weightsKey": key, "snapshot": snapshot})
    prior = ((body.get("status") or {}).get("pin") or {}).get("snapshot")
    if prior and prior != snapshot:     # it may leave the cache once no pod serves it (serving_step)
        o.fields["previousSnapshot"] = prior
    o.fields["download"].update(bytes=state.result.get("bytes"), totalBytes=state.result.get("bytes"),
                                files=state.result.get("files"), bytesPerSecond=None, etaSeconds=None)  # None: removed
    o.weights = (True, "Pulled", state.message)
    return commit, served_gguf(state.result.get("file_endpoints") or {})


def still_pulls(apis: Apis, config: OperatorConfig, body, key: str) -> bool:
    """Whether the resource `body` is a read of, as the API server has it now, still pulls weights `key`."""
    meta = body["metadata"]
    live = read_mdep(apis, meta["namespace"], meta["name"], fresh=True)
    return live is not None and not live["metadata"].get("deletionTimestamp") and \
        live["metadata"].get("uid") == meta.get("uid") and garbage.key_or_none(live, config) == key


def prune_running(apis: Apis, namespace: str, spec: ModelDeploymentSpec) -> str | None:
    """An unfinished prune Job taking this model out of this cache: a pull now would have its files removed under
    it (a resource deleted and made again at once)."""
    for job in prune_jobs(apis, namespace, spec.cache.claim_name):
        if (job["metadata"].get("annotations") or {}).get(ANNOTATION_MODEL, "").startswith(spec.model.id + "@") \
                and not {"Complete", "Failed"} & set(true_conditions(job)):
            return f"prune job {job['metadata']['name']}"
    return None


def remember_result(apis: Apis, job: dict, result: dict) -> None:
    """The puller's final line (its result, or its permanent failure) on the Job itself, so it outlives the pull
    pod; nothing is written when the Job already says it."""
    if recorded_line(job) == result:
        return
    meta = job["metadata"]
    try:
        apis.batch.patch_namespaced_job(meta["name"], meta["namespace"], {"metadata": {"annotations": {
            RESULT_ANNOTATION: json.dumps(result, sort_keys=True)}}})
    except ApiException as error:
        if error.status != 404:
            raise


def cache_too_small(spec: ModelDeploymentSpec, config: OperatorConfig, apis: Apis, capacity: str | None):
    """Before a pull: a message when the hub lists more bytes for the selected files than the cache PVC holds in
    all (what other models already use there is the puller's own check, on the mounted volume); PENDING while the
    hub is being asked."""
    if not capacity:
        return None
    needed = hub_listed_bytes(spec, config, apis)
    if needed is PENDING or needed is None:
        return needed
    if needed <= parse_quantity(capacity):
        return None
    return (f"the cache PVC {spec.cache.claim_name} holds {capacity} but the hub lists {needed / 2**20:.0f} MiB for "
            f"{spec.model.id}'s selected files: use a larger cache (spec.cache) or fewer files (spec.model.files)")


# -- 3. serving -------------------------------------------------------------------------------------------------------
def serving_step(body, spec: ModelDeploymentSpec, apis: Apis, config: OperatorConfig, o: Observation,
                 commit: str, gguf: str | None = None) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    wanted = spec.wanted_replicas(body.get("status"))
    deployment, service = build_deployment(name, spec, config, commit, wanted, gguf), build_service(name, spec)
    children = [deployment, service]
    if spec.monitoring.enabled and config.monitoring.pod_monitors == "auto" and pod_monitors_exist(
            apis, config.monitoring.discovery_interval_seconds):
        children.append(build_pod_monitor(name))
    group, version, plural = POD_MONITOR_API
    writers = {
        "Deployment": apis.apps.patch_namespaced_deployment,
        "Service": apis.core.patch_namespaced_service,
        "PodMonitor": lambda n, ns, b, **kw: apis.custom.patch_namespaced_custom_object(group, version, ns, plural,
                                                                                        n, b, **kw),
    }
    live = None
    try:
        for child in children:
            kopf.adopt(child, owner=dict(body))
            applied = apply(writers[child["kind"]], namespace, child,
                            apis.apps.replace_namespaced_deployment if child["kind"] == "Deployment" else None)
            if child["kind"] == "Deployment":
                live = apis.plain(applied)
    except Refused as refused:
        o.available = (False, "Refused", f"the API server refused {refused}")
        o.stalled = ("Refused", o.available[2])
        return
    status = live.get("status") or {}
    ready = status.get("readyReplicas") or 0
    # As `kubectl rollout status` judges it: the new template's pods all there and no old pod left, since an old
    # ready pod beside a new one that cannot start would otherwise count as ready.
    current = (status.get("observedGeneration") or 0) >= live["metadata"]["generation"] and \
        (status.get("updatedReplicas") or 0) >= wanted and (status.get("replicas") or 0) <= wanted
    o.fields.update(replicas=status.get("replicas") or 0, readyReplicas=ready, readyText=f"{ready}/{wanted}",
                    selector=",".join(f"{k}={v}" for k, v in server_selector(name).items()),
                    endpoint=f"http://{name}.{namespace}.svc:{spec.service.port}", desiredReplicas=wanted)
    if spec.autoscaling is None and (body.get("status") or {}).get("autoscaler"):
        o.fields["autoscaler"] = None       # the gateway's last decision means nothing any more
    if current and ready >= wanted:
        o.available = (True, "ReplicasReady" if wanted else "ScaledToZero", f"{ready}/{wanted} replicas ready")
        previous = o.fields.get("previousSnapshot") or (body.get("status") or {}).get("previousSnapshot")
        if previous and previous != f"{spec.model.id}@{commit}":     # rolled out: no pod serves it any more
            if config.cache.prune:
                garbage.prune_previous(apis, config, namespace, name, spec.cache.claim_name, previous)
            o.fields["previousSnapshot"] = None
        return
    selector = ",".join(f"{k}={v}" for k, v in server_selector(name).items())
    problem = server_problem(pods_of(apis, namespace, selector))
    reason = "Unschedulable" if "cannot be scheduled" in problem else (
        "RollingOut" if not current else "ReplicasNotReady")
    o.available = (False, reason, f"{ready}/{wanted} replicas ready{problem}")


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

