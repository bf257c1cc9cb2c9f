"""One reconcile of one ModelDeployment: observe (steps.py), write the status over the version that was read, post
the Events of its transitions. Reconciles run concurrently (kopf's workers, the progress refresher), so a write that
finds the resource changed since it was read is refused, and the reconcile runs again on a fresh read: an older
observation never overwrites a newer status, and each transition gets one Event."""

from __future__ import annotations

import contextlib
import logging
import time

from modeldeploy.reconcile import garbage, metrics
from modeldeploy.reconcile.children import Apis, read_mdep
from modeldeploy.reconcile.status import Observation, StaleRead, write_status
from modeldeploy.reconcile.steps import observe

log = logging.getLogger("modeldeploy.operator")
STALE_READ_ATTEMPTS = 3
PULLING_PHASES = ("Pending", "Pulling")
ERROR_RETRY_SECONDS = 10


def reconcile(body, memo) -> Observation:
    meta = body["metadata"]
    for _ in range(STALE_READ_ATTEMPTS - 1):
        try:
            observation = reconcile_as_read(body, memo)
            break
        except StaleRead:
            if (body := read_live(memo.apis, meta["namespace"], meta["name"], fresh=True)) is None:
                return Observation(generation=meta.get("generation", 1))
    else:
        observation = reconcile_as_read(body, memo)    # a third StaleRead reaches the caller, which retries
    waits = observation.retry and meta.get("uid") not in memo.apis.gone     # gone: its status write found it so
    schedule(memo, meta["namespace"], meta["name"], observation.retry_delay if waits else None)
    return observation


def schedule(memo, namespace: str, name: str, delay: float | None) -> None:
    """A reconcile that waits on something outside the spec (a claim binding, a hub's answer, a prune) runs again
    after `delay` seconds (the refresher's timer); None: nothing to wait for, no turn kept."""
    retries = getattr(memo, "retries", None)
    if retries is None:
        return
    if delay is None:
        retries.pop((namespace, name), None)
    else:
        retries[(namespace, name)] = time.monotonic() + delay


def reconcile_now(memo, body) -> None:
    """From the resource's own event: a failure is logged and tried again later, never raised into kopf (whose
    event handlers do not retry)."""
    meta = body["metadata"]
    try:
        reconcile(body, memo)
    except Exception:
        log.exception("mdep %s/%s: reconcile failed; trying again in %ss", meta["namespace"], meta["name"],
                      ERROR_RETRY_SECONDS)
        schedule(memo, meta["namespace"], meta["name"], ERROR_RETRY_SECONDS)


def reconcile_as_read(body, memo) -> Observation:
    meta = body["metadata"]
    previous = list((body.get("status") or {}).get("conditions") or [])
    observation = Observation(generation=meta.get("generation", 1))
    started, result = time.monotonic(), "error"
    try:
        try:
            observe(body, memo.apis, memo.config, observation)
            status = write_status(memo.apis, body, observation, previous)
        except StaleRead:
            result = "conflict"
            raise
        if status is not None:
            record(memo, meta["namespace"], meta["name"], status, observation.progress_in_log)
            before = (body.get("status") or {}).get("weightsKey")
            if before and before != status.get("weightsKey"):     # this write moved it: the old Job may go
                garbage.collect(memo.apis, memo.config, meta["namespace"], prune=False)
        result = "ok"
    finally:
        # A stall found before the failure still reaches the status; a half observation (say, a 500 from the API
        # server in the serving step) would turn a Ready resource not-Ready, so it is not written.
        if result == "error" and observation.stalled:
            with contextlib.suppress(Exception):
                write_status(memo.apis, body, observation, previous)
        metrics.RECONCILES.labels(result).inc()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    return observation


def record(memo, namespace: str, name: str, status: dict | None, progress_in_log: bool = False) -> None:
    """The phase in the metrics, and whether the progress refresher looks at this resource: only while its pull pod
    runs (a pull held back, by a quota say, costs nothing until its pod starts, which is an event)."""
    memo.phases.record(namespace, name, status["phase"] if status else None)
    if status is not None:
        metrics.record_download(namespace, name, status.get("download"))
    refreshing = getattr(memo, "refreshing", None)
    if refreshing is not None:
        if status is not None and progress_in_log and status["phase"] in PULLING_PHASES:
            refreshing.add((namespace, name))
        else:
            refreshing.discard((namespace, name))


def reconcile_by_name(memo, namespace: str, name: str, fresh: bool = False) -> None:
    """From a child's event or the refresher: one ModelDeployment's trouble must not stop the others'. `fresh`:
    read it from the API server (a GET), not from the watch's view."""
    try:
        if (body := read_live(memo.apis, namespace, name, fresh)) is not None:
            reconcile(body, memo)
        else:
            record(memo, namespace, name, None)
            schedule(memo, namespace, name, None)
    except Exception:
        log.exception("mdep %s/%s: reconcile (after a child's event, or refreshing progress) failed", namespace, name)
        schedule(memo, namespace, name, ERROR_RETRY_SECONDS)


def read_live(apis: Apis, namespace: str, name: str, fresh: bool = False) -> dict | None:
    """The resource as kopf's watch last saw it (or, `fresh`, as the API server has it now); None once it is gone
    or being deleted."""
    body = read_mdep(apis, namespace, name, fresh)
    return body if body is not None and not body["metadata"].get("deletionTimestamp") else None
