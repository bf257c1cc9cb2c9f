"""What kopf's watches have seen of the operator's objects (kopf indexes, declared in handlers.py), so a reconcile
reads its resource and its children without asking the API server: the cost of a reconcile is its writes.

A view can lag a write by a moment. Every decision made on one is level-triggered (the watch event that brings the
newer object reconciles again), a create that finds the object already there (409) is taken as made, and a status
written over a stale read is refused (resourceVersion) and redone on a fresh GET. A pull Job, which no later event
would take back, is checked against the resource right after it is made (steps.weights_step). Without views (a
reconcile run outside kopf's handlers, as some tests do) every read goes to the API server."""

from __future__ import annotations

import kopf

MDEPS, CLAIMS, PULL_JOBS, PRUNE_JOBS, PULL_PODS = "mdeps", "claims", "pull_jobs", "prune_jobs", "pull_pods"
BY_CLAIM = "by_claim"
NAMES = (MDEPS, CLAIMS, PULL_JOBS, PRUNE_JOBS, PULL_PODS, BY_CLAIM)


def slim(body) -> dict:
    """What a view keeps of an object: all but managedFields (often most of a body; a view of every PVC in a large
    cluster would otherwise hold them all)."""
    body = dict(body)
    body["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return body


class Views:
    def __init__(self, indexes: dict[str, kopf.Index]):
        self.indexes = indexes

    def values(self, index: str, key) -> list[dict]:
        return entries(self.indexes[index], key)

    def one(self, index: str, key) -> dict | None:
        found = self.values(index, key)
        return found[0] if found else None


def entries(index: kopf.Index, key) -> list:
    """A copy of an index entry. kopf updates indexes on its event loop while sync handlers and the refresher read
    them from threads: a copy that met a concurrent change is taken again."""
    for _ in range(10):
        try:
            return list(index.get(key, []))
        except RuntimeError:        # changed size during iteration
            continue
    return []
