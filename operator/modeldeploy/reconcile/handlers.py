"""The kopf wiring: which events reconcile which ModelDeployment. Each handler is small; the reconcile itself is in
reconciler.py (the write and its retry) and steps.py (what is observed and made). The same reconcile runs when the
resource changes and when one of its children does (a pull Job or its pod, the cache PVC, the Deployment or its pods),
so status follows the children without polling; only download progress, which lives in the pull pod's log, is
refreshed on a timer, and only for the resources that are pulling."""

from __future__ import annotations

import asyncio
import logging

import kopf

from modeldeploy.api import GROUP, PLURAL, VERSION, SpecError, parse_spec
from modeldeploy.manifests.common import LABEL_CACHE, LABEL_MDEP, LABEL_WEIGHTS
from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile import garbage, metrics
from modeldeploy.reconcile.children import Apis
from modeldeploy.reconcile.garbage import key_or_none
from modeldeploy.reconcile.reconciler import reconcile, reconcile_by_name, record

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
    if not isinstance(getattr(memo, "apis", None), Apis):
        memo.apis = Apis.create()
    memo.phases = metrics.PhaseBook()
    memo.pulling = set()
    if not isinstance(getattr(memo, "config", None), OperatorConfig):
        memo.config = OperatorConfig()


# -- indexes: which ModelDeployments a child concerns ----------------------------------------------------------------
@kopf.index(*MDEP)
def by_weights(namespace, name, body, memo, **_):
    key = key_or_none(body, memo.config)
    return {(namespace, key): name} if key else None


@kopf.index(*MDEP)
def by_claim(namespace, name, body, **_):
    """(namespace, claim) -> (name, spec) of each resource using that cache (their weights size it)."""
    try:
        spec = parse_spec(dict(body))
    except SpecError:
        return None
    return {(namespace, spec.cache.claim_name): (name, spec)}


def remember(memo, by_claim: kopf.Index) -> None:
    """kopf hands indexes to handlers only; the reconcile (also run by the refresher) reads this live view."""
    if getattr(memo, "cache_users", None) is None:
        memo.cache_users = lambda namespace, claim: [spec for _, spec in entries(by_claim, (namespace, claim))]


def entries(index: kopf.Index, key) -> list:
    """A copy of an index entry. kopf updates indexes on its event loop while sync handlers and the refresher read
    them from threads: a copy that met a concurrent change is taken again."""
    for _ in range(10):
        try:
            return list(index.get(key, []))
        except RuntimeError:        # changed size during iteration
            continue
    return []


# -- the resource's own handlers --------------------------------------------------------------------------------------
@kopf.on.resume(*MDEP)
@kopf.on.create(*MDEP)
@kopf.on.update(*MDEP, field="spec")
def on_change(body, memo, by_claim: kopf.Index, **_):
    """Retries (kopf's backoff) while something outside the spec may still change; stops on a bad spec."""
    remember(memo, by_claim)
    observation = reconcile(body, memo)     # a write that moves the weights key also collects the old Job
    if observation.stalled and observation.stalled[0] == "InvalidSpec":
        raise kopf.PermanentError(observation.stalled[1])
    if observation.retry:
        raise kopf.TemporaryError(observation.retry, delay=observation.retry_delay)


@kopf.on.event(*MDEP)
def on_gone(type, body, namespace, name, memo, **_):
    """Deployment and Service go with the resource (ownerReferences); the cache stays; the pull Job goes when no
    other ModelDeployment in the namespace needs the same weights. Seen from the DELETED event: no finalizer, so
    deletion never waits for the operator (and start-up catches up on deletions it missed)."""
    if type == "DELETED":
        record(memo, namespace, name, None)
        garbage.collect(memo.apis, memo.config, namespace)


@kopf.on.event(*MDEP)
def on_autoscaled(type, body, memo, by_claim: kopf.Index, **_):
    """The gateway's decision (status.autoscaler, which it alone writes) that the Deployment does not run yet: a
    status change, which the spec handlers above never see."""
    if type != "MODIFIED" or not (body.get("spec") or {}).get("autoscaling"):
        return
    try:
        spec = parse_spec(dict(body))
    except SpecError:
        return
    running = (body.get("status") or {}).get("desiredReplicas")     # None: not serving yet, nothing to move
    if running is not None and spec.wanted_replicas(body.get("status")) != running:
        remember(memo, by_claim)
        reconcile(body, memo)


@kopf.on.startup()
def collect_garbage_at_start(memo: kopf.Memo, **_) -> None:
    """Never fails: a start-up handler that raised would keep kopf from watching anything, for every tenant."""
    for namespace in getattr(memo, "namespaces", None) or [None]:
        try:
            garbage.collect(memo.apis, memo.config, namespace)
        except Exception:
            log.exception("collecting unused pull Jobs at start-up failed (namespace %s); deletions go on", namespace)


# -- children's events --------------------------------------------------------------------------------------------
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_WEIGHTS: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_WEIGHTS: kopf.PRESENT})
def on_pull(namespace, labels, memo, by_weights: kopf.Index, by_claim: kopf.Index, **_):
    remember(memo, by_claim)
    for name in entries(by_weights, (namespace, labels[LABEL_WEIGHTS])):
        reconcile_by_name(memo, namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/component": "prune", LABEL_CACHE: kopf.PRESENT})
def on_prune(type, body, memo, **_):
    if type != "DELETED":
        garbage.report_prune(memo.apis, dict(body))


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MDEP: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_MDEP: kopf.PRESENT})
def on_serving(namespace, labels, memo, by_claim: kopf.Index, **_):
    remember(memo, by_claim)
    reconcile_by_name(memo, namespace, labels[LABEL_MDEP])


@kopf.on.event("", "v1", "persistentvolumeclaims")
def on_claim(namespace, name, memo, by_claim: kopf.Index, **_):
    remember(memo, by_claim)
    for mdep, _ in entries(by_claim, (namespace, name)):
        reconcile_by_name(memo, namespace, mdep)


# Download progress lives in the pull pod's log, which makes no events: a background loop refreshes the resources
# that are pulling, and only those. (Not a kopf timer: timers put a finalizer on each resource, and a finalizer
# would make deletion hang whenever the operator is not running.)
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
        for namespace, name in sorted(memo.pulling):
            await asyncio.to_thread(reconcile_by_name, memo, namespace, name)
