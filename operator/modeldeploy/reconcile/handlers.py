"""The kopf wiring: which events reconcile which ModelDeployment. Each handler is small; the reconcile itself is in
reconciler.py (the write and its retry) and steps.py (what is observed and made). The same reconcile runs when the
resource changes and when one of its children does (a pull Job or its pod, the cache PVC, the Deployment or its pods),
so status follows the children without polling; only download progress, which lives in the pull pod's log, is
refreshed on a timer, and only for the resources whose pull pod runs. Reads come from kopf's indexes of the watched
objects (views.py): a reconcile costs the API server its writes, not its reads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

import kopf

from modeldeploy.api import GROUP, PLURAL, VERSION, SpecError, parse_spec
from modeldeploy.manifests.common import LABEL_CACHE, LABEL_COMPONENT, LABEL_MDEP, LABEL_WEIGHTS
from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile import garbage, metrics
from modeldeploy.reconcile.children import Apis
from modeldeploy.reconcile.garbage import key_or_none
from modeldeploy.reconcile.reconciler import reconcile_by_name, reconcile_now, record
from modeldeploy.reconcile.steps import cache_user
from modeldeploy.reconcile.views import NAMES, Views, entries, slim

log = logging.getLogger("modeldeploy.operator")
MDEP = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # kopf's own Events ("Handler succeeded") would double the operator's, which say what happened; its failures stay.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    # The operator's resources are known in advance: no watching of CRDs and namespaces (least-privilege RBAC).
    settings.scanning.disabled = True
    if not isinstance(getattr(memo, "apis", None), Apis):
        memo.apis = Apis.create()
    memo.phases = metrics.PhaseBook()
    memo.refreshing = set()
    memo.retries = {}
    memo.claim_states = {}
    memo.fan_out = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="claim-users")
    if not isinstance(getattr(memo, "config", None), OperatorConfig):
        memo.config = OperatorConfig()


# -- indexes: which ModelDeployments a child concerns ----------------------------------------------------------------
@kopf.index(*MDEP)
def by_weights(namespace, name, body, memo, **_):
    key = key_or_none(body, memo.config)
    return {(namespace, key): name} if key else {}      # {}, not None: None would keep an older entry


@kopf.index(*MDEP)
def by_claim(namespace, name, body, memo, **_):
    """(namespace, claim) -> (name, CacheUser or None) of each resource using that cache (their weights size it)."""
    try:
        spec = parse_spec(dict(body))
    except SpecError:
        return {}
    return {(namespace, spec.cache.claim_name): (name, cache_user(spec, memo.config))}


def remember(memo, indexes: dict) -> None:
    """kopf hands indexes to handlers only; the reconcile (also run by the refresher) reads these live views. They go
    on memo.apis, which every handler's copy of the memo shares (kopf gives each object a shallow copy)."""
    if memo.apis.views is None:
        memo.apis.views = Views({name: indexes[name] for name in NAMES})


# -- views: the objects as kopf's watches last saw them (views.py) ----------------------------------------------------
@kopf.index(*MDEP)
def mdeps(namespace, name, body, **_):
    return {(namespace, name): slim(body)}


@kopf.index("", "v1", "persistentvolumeclaims")
def claims(namespace, name, body, **_):
    return {(namespace, name): slim(body)}


@kopf.index("batch", "v1", "jobs", labels={LABEL_WEIGHTS: kopf.PRESENT})
def pull_jobs(namespace, name, body, **_):
    return {(namespace, name): slim(body)}


@kopf.index("batch", "v1", "jobs", labels={LABEL_COMPONENT: "prune", LABEL_CACHE: kopf.PRESENT})
def prune_jobs(namespace, labels, body, **_):
    return {(namespace, labels[LABEL_CACHE]): slim(body)}


@kopf.index("", "v1", "pods", labels={LABEL_WEIGHTS: kopf.PRESENT, "job-name": kopf.PRESENT})
def pull_pods(namespace, labels, body, **_):
    return {(namespace, labels["job-name"]): slim(body)}


# -- the resource's own events ----------------------------------------------------------------------------------------
@kopf.on.event(*MDEP)
def on_resource(type, body, namespace, name, memo, **kwargs):
    """Every event of the resource, the initial listing's included (type None: a start, or a restart after the
    operator was down). It reconciles a spec the status has not seen yet (observedGeneration), everything at
    start-up, and a gateway decision the Deployment does not run yet; the operator's own status writes come back
    here and cost nothing. kopf writes nothing to the resource (no progress, no diff base, no finalizer): a reconcile
    that waits on something outside the spec is run again by the operator's own timer (reconciler.schedule)."""
    remember(memo, kwargs)
    if type == "DELETED":
        # Deployment and Service go with the resource (ownerReferences); the cache stays; the pull Job goes when no
        # other ModelDeployment in the namespace needs the same weights. No finalizer: deletion never waits for the
        # operator, and start-up catches up on deletions it missed.
        record(memo, namespace, name, None)
        memo.apis.written.pop((namespace, name), None)
        memo.apis.gone.discard(body["metadata"].get("uid"))
        memo.retries.pop((namespace, name), None)
        try:
            garbage.collect(memo.apis, memo.config, namespace)
        except Exception:       # kopf does not retry event handlers: the next deletion or start-up catches up
            log.exception("collecting unused pull Jobs after %s/%s was deleted failed", namespace, name)
        return
    meta, status = body["metadata"], body.get("status") or {}
    if meta.get("deletionTimestamp"):
        return
    if type is None or status.get("observedGeneration") != meta.get("generation") or autoscaler_moved(body):
        reconcile_now(memo, body)


def autoscaler_moved(body) -> bool:
    """The gateway's decision (status.autoscaler, which it alone writes) differs from what the Deployment runs."""
    if not (body.get("spec") or {}).get("autoscaling"):
        return False
    try:
        spec = parse_spec(dict(body))
    except SpecError:
        return False
    running = (body.get("status") or {}).get("desiredReplicas")     # None: not serving yet, nothing to move
    return running is not None and spec.wanted_replicas(body.get("status")) != running


@kopf.on.startup()
def collect_garbage_at_start(memo: kopf.Memo, **_) -> None:
    """Never fails (collect_everywhere): a start-up handler that raised would keep kopf from watching anything, for
    every tenant."""
    collect_everywhere(memo, "at start-up")


def collect_everywhere(memo, when: str) -> None:
    for namespace in getattr(memo, "namespaces", None) or [None]:
        try:
            garbage.collect(memo.apis, memo.config, namespace)
        except Exception:
            log.exception("collecting unused pull Jobs %s failed (namespace %s); it is tried again later", when,
                          namespace)


# -- children's events --------------------------------------------------------------------------------------------
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_WEIGHTS: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_WEIGHTS: kopf.PRESENT})
def on_pull(type, namespace, labels, memo, by_weights: kopf.Index, **kwargs):
    remember(memo, kwargs)
    for name in entries(by_weights, (namespace, labels[LABEL_WEIGHTS])):
        reconcile_by_name(memo, namespace, name, fresh=type == "DELETED")


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/component": "prune", LABEL_CACHE: kopf.PRESENT})
def on_prune(type, body, memo, **_):
    if type != "DELETED":
        garbage.report_prune(memo.apis, dict(body))


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MDEP: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_MDEP: kopf.PRESENT})
def on_serving(type, namespace, labels, memo, **kwargs):
    """A child that went (say, the garbage collector removing what a deleted resource owned) is checked against
    the resource as the API server has it, not only as the watch last saw it (views.py: a resource deleted while
    the watch was down stays in kopf's view)."""
    remember(memo, kwargs)
    reconcile_by_name(memo, namespace, labels[LABEL_MDEP], fresh=type == "DELETED")


@kopf.on.event("", "v1", "persistentvolumeclaims")
def on_claim(type, namespace, name, body, memo, by_claim: kopf.Index, **kwargs):
    """Every user of the claim, but only when what the reconcile reads of it changed (a claim shared by a thousand
    ModelDeployments would otherwise cost a thousand reconciles for each of its metadata updates)."""
    remember(memo, {"by_claim": by_claim, **kwargs})
    status = body.get("status") or {}
    state = None if type == "DELETED" else (
        status.get("phase"), (status.get("capacity") or {}).get("storage"),
        ((body.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage"),
        tuple(sorted(c["type"] for c in status.get("conditions") or [] if c.get("status") == "True")))
    known = memo.claim_states.get((namespace, name), "unseen")
    if state is None:
        memo.claim_states.pop((namespace, name), None)
    else:
        memo.claim_states[(namespace, name)] = state
    # Unchanged, or first seen in the initial listing (every resource reconciles then anyway): no fan-out.
    if known == state or (type is None and known == "unseen"):
        return
    users = [mdep for mdep, _ in entries(by_claim, (namespace, name))]
    list(memo.fan_out.map(lambda mdep: reconcile_by_name(memo, namespace, mdep), users))


# Download progress lives in the pull pod's log, which makes no events: a background loop refreshes the resources
# whose pull pod runs, and only those, and runs the reconciles that asked to look again later. (Not kopf timers: they
# put a finalizer on each resource, which would make deletion hang whenever the operator is not running.) The same
# loop looks for unused pull Jobs now and then, as start-up does: one that the collections after deletions and
# changes could not take back goes within config.pull.collectIntervalSeconds (the API server failed that collection,
# or the check after a Job was made; the spec moved back to its old weights right after a reconcile made and checked
# its Job, so its status write was refused and the redo moved no key).
PROGRESS_INTERVAL = 5.0
TICK_SECONDS = 1.0


@kopf.on.startup()
async def start_progress_refresher(memo: kopf.Memo, **_) -> None:
    memo.refresher = asyncio.get_running_loop().create_task(refresh_forever(memo))


@kopf.on.cleanup()
async def stop_progress_refresher(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "refresher", None):
        memo.refresher.cancel()


async def refresh_forever(memo) -> None:
    """Never waits for a reconcile: one stuck on a slow request must not hold back every other resource's turn."""
    progress_at = collected_at = time.monotonic()
    running, collecting = {}, None
    while True:
        await asyncio.sleep(TICK_SECONDS)
        try:
            now = time.monotonic()
            running = {key: future for key, future in running.items() if not future.done()}
            due = {key for key, when in list(memo.retries.items()) if when <= now and key not in running}
            for key in due:
                memo.retries.pop(key, None)      # a reconcile that still waits asks again
            if now - progress_at >= PROGRESS_INTERVAL:
                due |= set(memo.refreshing) - set(running)
                progress_at = now
            if now - collected_at >= memo.config.pull.collect_interval_seconds and (collecting is None or
                                                                                    collecting.done()):
                collecting = memo.fan_out.submit(collect_everywhere, memo, "on the timer")
                collected_at = now
            for namespace, name in sorted(due):
                # Fresh: the turn is the timer's, and a resource deleted while the watch was down must end here.
                running[(namespace, name)] = memo.fan_out.submit(reconcile_by_name, memo, namespace, name, True)
        except Exception:
            log.exception("the refresher's turn failed; it goes on")
