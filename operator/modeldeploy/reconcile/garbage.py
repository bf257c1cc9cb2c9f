"""Nothing leaks: pull Jobs are collected by their weights label against the live ModelDeployments, at start-up and
after every deletion or change of what a resource pulls, so a deletion during an operator outage, a changed model id
or a changed token reference releases its Job too. Shared Jobs are owned by no single resource, so ownerReferences
cannot do this."""

from __future__ import annotations

import logging

from kubernetes.client.rest import ApiException

from modeldeploy.api import GROUP, PLURAL, VERSION
from modeldeploy.build.common import LABEL_WEIGHTS
from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile.children import Apis
from modeldeploy.reconcile.reconciler import key_or_none

log = logging.getLogger("modeldeploy.operator")


def unused_jobs(jobs: list[dict], mdeps: list[dict], config: OperatorConfig) -> list[dict]:
    """The pull Jobs whose weights key no live ModelDeployment of their namespace has."""
    live = {(m["metadata"]["namespace"], key) for m in mdeps
            if not m["metadata"].get("deletionTimestamp") and (key := key_or_none(m, config))}
    return [j for j in jobs
            if (j["metadata"]["namespace"], (j["metadata"].get("labels") or {}).get(LABEL_WEIGHTS)) not in live]


def collect(apis: Apis, config: OperatorConfig, namespace: str | None) -> list[str]:
    """Deletes the unused pull Jobs of one namespace (None: every watched one); returns their names. Jobs are listed
    before the resources: a Job made after that listing belongs to a resource the second listing sees."""
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
        try:
            apis.batch.delete_namespaced_job(meta["name"], meta["namespace"], propagation_policy="Background")
        except ApiException as error:
            if error.status != 404:
                raise
            continue
        log.info("pull job %s/%s deleted: no ModelDeployment pulls its weights any more", meta["namespace"],
                 meta["name"])
        deleted.append(meta["name"])
    return deleted
