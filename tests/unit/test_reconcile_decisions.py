"""The reconcile's decisions over Kubernetes objects as the API serves them (shapes recorded from the local cluster):
the pull state from a Job and its pods, why serving pods are not ready, when a status write is needed, which pull Jobs
are garbage, and the conditions a step's observation becomes."""

from __future__ import annotations

import json

from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile.children import server_problem
from modeldeploy.reconcile.garbage import unused_jobs
from modeldeploy.reconcile.pull_state import RESULT_ANNOTATION, pull_state
from modeldeploy.reconcile.status import Observation, status_patch, unchanged

COMMIT = "c" * 40
COMPLETE = {"event": "complete", "commit": COMMIT, "files": 7, "bytes": 91_000_000, "cached": False}


def job(conditions=(), annotations=None) -> dict:
    return {"metadata": {"name": "pull-m-0123456789ab", "namespace": "ml", "annotations": annotations or {},
                         "uid": "uid-of-the-job",
                         "labels": {"modeldeploy.io/weights": "0123456789ab"}},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                      for t, r, m in conditions]}}


def pod(created: str, terminated: dict | None = None, waiting: dict | None = None, unschedulable: str | None = None,
        phase: str = "Pending", owner: str = "uid-of-the-job") -> dict:
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}] \
        if unschedulable else [{"type": "PodScheduled", "status": "True"}]
    return {"metadata": {"name": f"pull-{created[-2:]}", "creationTimestamp": created,
                         "ownerReferences": [{"kind": "Job", "uid": owner, "controller": True}]},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [] if unschedulable else [{"name": "pull", "state": state}]}}


def exited(code: int, line: dict | None = None, reason: str = "Error") -> dict:
    return {"exitCode": code, "reason": reason, "message": json.dumps(line) if line else ""}


def test_the_jobs_completion_decides_and_its_result_outlives_the_pods():
    done = pull_state(job([("Complete", None, None)]), [pod("2026-11-25T10:00:01Z", exited(0, COMPLETE, "Completed"))])
    assert done.done and done.result["commit"] == COMMIT and "7 files" in done.message
    kept = pull_state(job([("Complete", None, None)], {RESULT_ANNOTATION: json.dumps(COMPLETE)}), [])
    assert kept.done and kept.result["commit"] == COMMIT                  # the pod was garbage-collected
    lost = pull_state(job([("Complete", None, None)]), [])
    assert lost.rerun and not lost.done                                    # run again: the cache has the files


def test_a_pod_that_exited_0_is_not_done_before_the_job_says_so():
    state = pull_state(job(), [pod("2026-11-25T10:00:01Z", exited(0, COMPLETE, "Completed"))])
    assert not state.done and not state.failed


def test_every_way_a_pull_ends_reaches_the_status():
    oom = pull_state(job([("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]),
                     [pod("2026-11-25T10:00:01Z", exited(137, reason="OOMKilled")),
                      pod("2026-11-25T10:00:09Z", exited(137, reason="OOMKilled"))])
    assert (oom.permanent, oom.reason) == (True, "OOMKilled") and "BackoffLimitExceeded" in oom.message
    deadline = pull_state(job([("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]), [])
    assert (deadline.permanent, deadline.reason) == (True, "DeadlineExceeded")
    backoff = pull_state(job([("Failed", "BackoffLimitExceeded", "")]),
                         [pod("2026-11-25T10:00:01Z", exited(4, {"event": "failed", "reason": "NetworkError",
                                                                  "message": "connection reset"}))])
    assert (backoff.reason, backoff.permanent) == ("NetworkError", True) and "connection reset" in backoff.message
    lost_pods = pull_state(job([("Failed", "BackoffLimitExceeded", "backoff limit")]), [])
    assert (lost_pods.reason, lost_pods.permanent) == ("BackoffLimitExceeded", True)


def test_the_puller_s_permanent_failures_stop_at_once_and_transient_ones_retry():
    missing = pull_state(job(), [pod("2026-11-25T10:00:01Z", exited(3, {"event": "failed", "reason": "NotFound",
                                                                         "message": "no such model"}))])
    assert (missing.reason, missing.permanent) == ("NotFound", True)
    retrying = pull_state(job(), [pod("2026-11-25T10:00:01Z", exited(4, {"event": "failed", "reason": "Stalled",
                                                                          "message": "no bytes"}))])
    assert (retrying.reason, retrying.permanent, retrying.failed) == ("Retrying", False, True)
    newer_running = pull_state(job(), [pod("2026-11-25T10:00:01Z", exited(137, reason="OOMKilled")),
                                       pod("2026-11-25T10:00:30Z", phase="Running")])
    assert (newer_running.reason, newer_running.failed) == ("Pulling", False)


def test_a_permanent_failure_stays_the_answer_while_the_job_retries():
    """Without podFailurePolicy (before Kubernetes 1.26) the Job starts another pod after a permanent failure: the
    status must not flap back to Progressing (and post another Warning) with each one."""
    not_found = {"event": "failed", "reason": "NotFound", "message": "no such model"}
    first = pod("2026-11-25T10:00:01Z", exited(3, not_found))
    for newer in (pod("2026-11-25T10:00:12Z"), pod("2026-11-25T10:00:12Z", phase="Running"),
                  pod("2026-11-25T10:00:12Z", exited(4, {"event": "failed", "reason": "NetworkError"}))):
        state = pull_state(job(), [first, newer])
        assert (state.reason, state.permanent, state.message) == ("NotFound", True, "no such model")
        assert state.result == not_found                       # what the operator keeps on the Job
    kept = pull_state(job(annotations={RESULT_ANNOTATION: json.dumps(not_found)}), [pod("2026-11-25T10:00:12Z")])
    assert (kept.reason, kept.permanent) == ("NotFound", True)          # the failed pod is gone
    failed = pull_state(job([("Failed", "PodFailurePolicy", "Container pull for pod ml/pull-01 failed with exit "
                                                            "code 3 matching FailJob rule at index 0")]), [first])
    assert (failed.reason, failed.message) == ("NotFound", "no such model")     # the same words as before it failed
    recovered = pull_state(job([("Complete", None, None)], {RESULT_ANNOTATION: json.dumps(not_found)}),
                           [first, pod("2026-11-25T10:00:40Z", exited(0, COMPLETE, "Completed"))])
    assert recovered.done and recovered.result == COMPLETE    # a retry that got through (the model was uploaded)
    unauthorized = pod("2026-11-25T10:00:30Z", exited(3, {"event": "failed", "reason": "Unauthorized"}))
    assert pull_state(job(), [first, unauthorized]).reason == "NotFound"        # the first one stays the answer


def test_a_job_made_again_under_the_same_name_is_not_judged_by_the_old_one_s_pods():
    """Deleting a failed pull's Job is how a pull is tried again; the old Job's pods (same job-name label) linger
    a moment, or for good with --cascade=orphan."""
    old = pod("2026-11-25T10:00:01Z", exited(3, {"event": "failed", "reason": "NotFound"}), owner="uid-of-the-old-job")
    state = pull_state(job(), [old, pod("2026-11-25T10:05:00Z", phase="Running")])
    assert (state.reason, state.failed) == ("Pulling", False)
    assert pull_state(job(), [old]).reason == "Pulling"


def test_what_a_pod_or_an_annotation_says_is_taken_only_in_the_puller_s_terms():
    """The termination message and the Job's annotation can be written by anyone who may edit the namespace's pods
    and Jobs: a reason the puller never gives, or a message that is no text, would fail every status write."""
    for line in ({"event": "failed", "reason": ["NotFound"], "message": {"a": 1}},
                 {"event": "failed", "reason": "<script>", "message": 42},
                 {"event": "failed", "reason": None, "message": "x" * 5000}):
        for state in (pull_state(job(annotations={RESULT_ANNOTATION: json.dumps(line)}), []),
                      pull_state(job(), [pod("2026-11-25T10:00:01Z", exited(3, line))])):
            assert state.reason == "PullFailed" and isinstance(state.message, str) and len(state.message) <= 1000


def test_a_pull_pod_that_cannot_start_says_why():
    secret = pull_state(job(), [pod("2026-11-25T10:00:01Z", waiting={
        "reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'})])
    assert secret.reason == "CreateContainerConfigError" and 'secret "hf-token" not found' in secret.message
    unscheduled = pull_state(job(), [pod("2026-11-25T10:00:01Z", unschedulable="0/1 nodes are available: 1 node(s) "
                                                                                "didn't find available persistent "
                                                                                "volumes to bind.")])
    assert unscheduled.reason == "Unschedulable" and "persistent volumes" in unscheduled.message
    creating = pull_state(job(), [pod("2026-11-25T10:00:01Z", waiting={"reason": "ContainerCreating"})])
    assert creating.reason == "Pulling"


def test_why_serving_pods_are_not_ready():
    assert server_problem([pod("2026-11-25T10:00:01Z", unschedulable="0/1 nodes are available: 1 Insufficient "
                                                                     "nvidia.com/gpu.")]) \
        .endswith("cannot be scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    assert "ImagePullBackOff" in server_problem([pod("2026-11-25T10:00:01Z", waiting={"reason": "ImagePullBackOff"})])
    assert server_problem([pod("2026-11-25T10:00:01Z", phase="Running")]) == ""


def test_a_reconcile_that_found_nothing_new_writes_nothing():
    observation = Observation(generation=2, cache=(True, "Bound", "PVC model-cache is bound (1Gi)"),
                              weights=(True, "Pulled", "7 files"), available=(True, "ReplicasReady", "1/1"),
                              fields={"download": {"job": "j", "bytes": 9, "bytesPerSecond": None}})
    first, _ = status_patch(observation, [])
    stored = json.loads(json.dumps({**first, "download": {"job": "j", "bytes": 9}, "kopf": {"progress": {}}}))
    again, changed = status_patch(observation, stored["conditions"])
    assert not changed and unchanged(stored, again)
    moved = Observation(**{**observation.__dict__, "available": (False, "ReplicasNotReady", "0/1")})
    assert not unchanged(stored, status_patch(moved, stored["conditions"])[0])
    assert not unchanged({**stored, "download": {"job": "j", "bytes": 9, "bytesPerSecond": 5}}, again)


def mdep(name: str, model: str, namespace: str = "ml", deleting: bool = False) -> dict:
    meta = {"name": name, "namespace": namespace, **({"deletionTimestamp": "2026-11-25T10:00:00Z"} if deleting else {})}
    return {"apiVersion": "modeldeploy.io/v1alpha1", "kind": "ModelDeployment", "metadata": meta,
            "spec": {"model": {"id": model}}}


def test_pull_jobs_no_live_resource_needs_are_garbage():
    from modeldeploy.manifests.common import weights_key
    from modeldeploy.api import parse_spec

    config = OperatorConfig()
    live, gone, other_ns = mdep("a", "org/a"), mdep("b", "org/b", deleting=True), mdep("c", "org/c", "other")

    def job_of(body) -> dict:
        key = weights_key(parse_spec(body), config)
        return {"metadata": {"name": f"pull-{key}", "namespace": body["metadata"]["namespace"],
                             "labels": {"modeldeploy.io/weights": key}}}

    jobs = [job_of(live), job_of(gone), job_of(mdep("x", "org/c"))]    # org/c is live only in another namespace
    assert [j["metadata"]["name"] for j in unused_jobs(jobs, [live, gone, other_ns], config)] == \
        [jobs[1]["metadata"]["name"], jobs[2]["metadata"]["name"]]
    assert unused_jobs(jobs[:1], [live], config) == []


def test_a_snapshot_is_in_use_while_a_resource_still_rolls_off_it():
    """A collection (at start-up, on the timer, after a deletion) prunes what no resource on the cache uses. A
    resource that moved to another commit still has pods on its previous snapshot until they roll: that one stays,
    except for the resource's own prune once its pods have rolled."""
    from modeldeploy.reconcile.garbage import snapshots_in_use

    old, new = "a" * 40, "b" * 40
    rolling = mdep("r", "org/a")
    rolling["spec"]["cache"] = {"claimName": "shared"}
    rolling["status"] = {"resolvedRevision": new, "previousSnapshot": f"org/a@{old}"}
    elsewhere = mdep("e", "org/e")         # another cache: not counted
    elsewhere["status"] = {"resolvedRevision": old, "previousSnapshot": f"org/e@{old}"}
    resolving = mdep("s", "org/s")
    resolving["spec"]["cache"] = {"claimName": "shared"}
    assert snapshots_in_use([rolling, elsewhere, resolving], "shared") == ({f"org/a@{new}", f"org/a@{old}"},
                                                                          {"org/s"})
    assert snapshots_in_use([rolling, elsewhere, resolving], "shared", rolled_off_by="r") == ({f"org/a@{new}"},
                                                                                             {"org/s"})


def test_a_status_just_written_is_read_until_the_watch_brings_it_or_something_newer():
    """A child's event that comes before the watch brings the operator's own status write would otherwise reconcile
    over the stale view, write the same status again and be refused (409): a GET and a PATCH for nothing."""
    from modeldeploy.reconcile.children import Apis, read_mdep, wrote_status
    from modeldeploy.reconcile.views import MDEPS, Views

    def version(rv: str, phase: str) -> dict:
        return {"metadata": {"name": "m", "namespace": "ml", "resourceVersion": rv}, "status": {"phase": phase}}

    seen = {("ml", "m"): [version("10", "Pending")]}
    apis = Apis.create()
    apis.views = Views({MDEPS: seen})
    wrote_status(apis, seen[("ml", "m")][0], version("11", "Pulling"))
    assert read_mdep(apis, "ml", "m")["status"]["phase"] == "Pulling"        # the view still shows 10
    seen[("ml", "m")] = [version("12", "Pulling")]                             # the watch moved on (11, or later)
    assert read_mdep(apis, "ml", "m")["metadata"]["resourceVersion"] == "12"
    assert apis.written == {}
    wrote_status(apis, version("12", "Pulling"), version("13", "Ready"))
    del seen[("ml", "m")]                                                      # deleted: never read back as written
    assert read_mdep(apis, "ml", "m") is None and apis.written == {}


def test_a_resource_the_api_server_no_longer_has_is_not_read_from_a_stale_view():
    """kopf keeps the index entry of a resource deleted while its watch was down (a re-list never removes): once a
    fresh read or a status write got 404 for it, the view's copy is not used again (no Deployment made anew for a
    resource that is gone, no retries for it for ever)."""
    from modeldeploy.reconcile.children import Apis, read_mdep, went
    from modeldeploy.reconcile.views import MDEPS, Views, slim

    ghost = {"metadata": {"name": "m", "namespace": "ml", "uid": "u-1", "resourceVersion": "7",
                          "managedFields": [{"manager": "kubectl"}]}}
    apis = Apis.create()
    apis.views = Views({MDEPS: {("ml", "m"): [slim(ghost)]}})
    assert read_mdep(apis, "ml", "m")["metadata"] == {"name": "m", "namespace": "ml", "uid": "u-1",
                                                      "resourceVersion": "7"}      # kept without managedFields
    went(apis, ghost)
    assert read_mdep(apis, "ml", "m") is None
    apis.views.indexes[MDEPS][("ml", "m")] = [{"metadata": {**ghost["metadata"], "uid": "u-2"}}]
    assert read_mdep(apis, "ml", "m")["metadata"]["uid"] == "u-2"                   # made again under that name
