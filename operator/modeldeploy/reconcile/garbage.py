"""Nothing leaks: pull Jobs are collected by their weights label against the live ModelDeployments, at start-up and
after every deletion or change of what a resource pulls, so a deletion during an operator outage, a changed model id
or a changed token reference releases its Job too. Shared Jobs are owned by no single resource, so ownerReferences
cannot do this."""

from __future__ import annotations

import logging
import re

from kubernetes.client.rest import ApiException

from modeldeploy.api import GROUP, PLURAL, VERSION, SpecError, name_problems, parse_spec
from modeldeploy.manifests.cache import build_prune_job
from modeldeploy.manifests.common import LABEL_CACHE, LABEL_WEIGHTS, weights_key
from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile import events
from modeldeploy.pull import names
from modeldeploy.pull.names import COMMIT_RE
from modeldeploy.reconcile.children import Apis, api_message, create_if_absent, pods_of
from modeldeploy.reconcile.pull_state import completed_result, final_line, terminated, true_conditions

log = logging.getLogger("modeldeploy.operator")
CLAIM_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")    # as the CRD takes claimName: it is a label value


def key_or_none(body, config: OperatorConfig) -> str | None:
    """The weights key of a resource that may pull (None for one the operator refuses)."""
    try:
        spec = parse_spec(dict(body))
    except SpecError:
        return None
    if spec.problems(config) or name_problems(body["metadata"]["name"]):
        return None
    return weights_key(spec, config)


def unused_jobs(jobs: list[dict], mdeps: list[dict], config: OperatorConfig) -> list[dict]:
    """The pull Jobs whose weights key no live ModelDeployment of their namespace has."""
    live = {(m["metadata"]["namespace"], key) for m in mdeps
            if not m["metadata"].get("deletionTimestamp") and (key := key_or_none(m, config))}
    return [j for j in jobs
            if (j["metadata"]["namespace"], (j["metadata"].get("labels") or {}).get(LABEL_WEIGHTS)) not in live]


def collect(apis: Apis, config: OperatorConfig, namespace: str | None, prune: bool = True) -> list[str]:
    """Deletes the unused pull Jobs of one namespace (None: every watched one); returns their names. Jobs are listed
    before the resources: a Job made after that listing belongs to a resource the second listing sees. `prune`:
    also take their snapshots out of the cache (not when a resource's key just moved: its pods still serve the old
    snapshot until they roll, and the resource prunes it then). One Job's trouble never stops the others'."""
    selector = LABEL_WEIGHTS
    if namespace:
        jobs = apis.batch.list_namespaced_job(namespace, label_selector=selector).items
        mdeps = apis.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    else:
        jobs = apis.batch.list_job_for_all_namespaces(label_selector=selector).items
        mdeps = apis.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    deleted = []
    for job in unused_jobs(apis.plain(jobs), mdeps, config):
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            apis.batch.delete_namespaced_job(meta["name"], meta["namespace"], propagation_policy="Background")
            log.info("pull job %s/%s deleted: no ModelDeployment pulls its weights any more", meta["namespace"],
                     meta["name"])
            deleted.append(meta["name"])
            if prune and config.cache.prune:
                prune_if_unused(apis, config, job,
                                [m for m in mdeps if m["metadata"]["namespace"] == meta["namespace"]])
        except ApiException as error:
            if error.status != 404:
                log.warning("pull job %s/%s: collecting it failed: %s", meta["namespace"], meta["name"],
                            api_message(error))
    return deleted


def claim_of(job: dict) -> str | None:
    volumes = job["spec"]["template"]["spec"].get("volumes") or []
    return next((v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")), None)


def snapshots_in_use(mdeps: list[dict], claim: str, rolled_off_by: str | None = None) -> tuple[set[str], set[str]]:
    """(ORG/NAME@COMMIT of every live resource on this cache, and those their pods may still serve while they roll
    off them (status.previousSnapshot), except the one resource `rolled_off_by` names, whose pods just did; models
    some live resource has not resolved yet)."""
    used, unresolved = set(), set()
    for body in mdeps:
        if body["metadata"].get("deletionTimestamp"):
            continue
        try:
            spec = parse_spec(body)
        except SpecError:
            continue
        if spec.cache.claim_name != claim:
            continue
        status = body.get("status") or {}
        if status.get("resolvedRevision"):
            used.add(f"{spec.model.id}@{status['resolvedRevision']}")
        else:
            unresolved.add(spec.model.id)
        if status.get("previousSnapshot") and body["metadata"]["name"] != rolled_off_by:
            used.add(status["previousSnapshot"])
    return used, unresolved


def prune_if_unused(apis: Apis, config: OperatorConfig, job: dict, mdeps: list[dict]) -> None:
    """After a finished pull's Job goes: a Job that takes its snapshot out of the cache, unless a live resource
    uses it, or might (one of the same model that has not resolved its commit yet)."""
    result, claim = completed_result(job, []), claim_of(job)
    if not result or not claim or not result.get("repo") or not result.get("commit"):
        return
    prune_snapshot(apis, config, job["metadata"]["namespace"], claim, f"{result['repo']}@{result['commit']}", mdeps)


def prune_previous(apis: Apis, config: OperatorConfig, namespace: str, name: str, claim: str, snapshot: str) -> None:
    """Resource `name` rolled off `snapshot` (ORG/NAME@COMMIT: its model or revision moved): that snapshot leaves the
    cache unless another resource uses it."""
    mdeps = apis.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    prune_snapshot(apis, config, namespace, claim, snapshot, mdeps, rolled_off_by=name)


def prune_snapshot(apis: Apis, config: OperatorConfig, namespace: str, claim: str, snapshot: str,
                   mdeps: list[dict], rolled_off_by: str | None = None) -> None:
    model, _, commit = snapshot.rpartition("@")
    try:   # what a Job's annotation says is checked: a tenant can write it
        names.repo_id(model)
        if not COMMIT_RE.fullmatch(commit) or not CLAIM_RE.fullmatch(claim):
            raise ValueError(snapshot)
    except ValueError:
        log.warning("cache %s/%s: not pruning %r: not a model@commit", namespace, claim, snapshot)
        return
    used, unresolved = snapshots_in_use(mdeps, claim, rolled_off_by)
    if snapshot in used or model in unresolved:
        return
    try:
        if create_if_absent(apis.batch.create_namespaced_job, namespace,
                            build_prune_job(claim, model, commit, sorted(used), config)):
            log.info("cache %s/%s: pruning %s (no ModelDeployment uses it)", namespace, claim, snapshot)
    except ApiException as error:
        log.warning("cache %s/%s: could not start pruning %s: %s", namespace, claim, snapshot, api_message(error))


def report_prune(apis: Apis, job: dict) -> bool:
    """A finished prune Job: what it freed becomes an Event on the cache PVC, and the Job goes. True when done."""
    conditions, meta = true_conditions(job), job["metadata"]
    if meta.get("deletionTimestamp") or not ({"Complete", "Failed"} & set(conditions)):
        return False
    namespace, claim = meta["namespace"], (meta.get("labels") or {}).get(LABEL_CACHE)
    lines = [final_line(terminated(p)) for p in pods_of(apis, namespace, f"job-name={meta['name']}")]
    line = next((x for x in lines if x and x.get("event") == "pruned"), None) or next((x for x in lines if x), None)
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace}}
    model = (meta.get("annotations") or {}).get("modeldeploy.io/model", "")
    if line and line.get("event") == "pruned":
        events.info(apis.core, pvc, "WeightsPruned",
                    f"{model}: freed {line.get('freed_bytes', 0) / 2**20:.1f} MiB ({line.get('removed_blobs')} files; "
                    f"{line.get('kept_blobs')} kept, shared with other snapshots)")
    else:
        events.warn(apis.core, pvc, "PruneFailed", f"{model}: " + ((line or {}).get("message") or
                                                                   f"the prune Job failed ({conditions})"))
    try:
        apis.batch.delete_namespaced_job(meta["name"], namespace, propagation_policy="Background")
    except ApiException as error:
        if error.status != 404:
            raise
    return True
