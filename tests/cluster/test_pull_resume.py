"""A pull pod lost mid-file on the real cluster, as a lost node loses it (issue 13): the Job's next pod continues
from the bytes already on the cache volume, and the ModelDeployment's status shows the download going on.

Tried, with the project's images and the operator as a host process: a hub on the bridge address serving one
repository with a 192 MiB safetensors file over a link capped at 10 MB/s; a ModelDeployment of it with replicas 0
(Ready once the weights are in). Once the status's `download.bytes` passes 40% of the file, the pull pod is
force-deleted (`kubectl delete pod --grace-period=0 --force`: the API object goes at once, the kubelet kills the
container). The link is then slowed to 4 MB/s, so the new pod's transfer lasts long enough for the operator's
5-second progress refresh to show it. Checked:
- the Job's next pod finishes the pull: WeightsReady and Ready True, `resolvedRevision` the hub's commit;
- the hub sent at most 1.1x the file (before stable partials a cut cost 1.5x or more), and the new pod asked for
  ranges that start inside the segments the first pod had begun, never at a fresh segment's start;
- the new pod's first progress line is already past what the status showed at the cut, its result counts only the
  bytes still missing, and the status showed one of the new pod's own progress values on the way;
- `download.bytes`, sampled through the whole run, never fell back after the cut (flat while the new pod starts)."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

from tests.cluster.test_operator import GROUP, PLURAL, VERSION, condition, crd, mdep  # noqa: F401 (crd: fixture)
from tests.cluster.test_operator_pull import NODE_ADDRESS, kubectl
from tests.helpers import operator_process, wait_for
from tests.hubserver import HubServer, Repo, RepoFile
from tests.test_pull_network import safetensors

MODEL = "org/resumable"
BIG = "model.safetensors"
MEGABYTES = 192
LINK = 10e6          # bytes/s until the cut
SLOWER_LINK = 4e6    # after it


@pytest.fixture(scope="module")
def hub(kubeconfig):   # the bridge address exists once the cluster runs
    server = HubServer(bandwidth=LINK)
    server.add_repo(Repo.from_files(MODEL, {"config.json": RepoFile("config.json", b'{"model_type": "bert"}'),
                                            BIG: RepoFile(BIG, safetensors(MEGABYTES))}))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


@pytest.fixture
def operator(kubeconfig, crd, namespace, images, hub, tmp_path):  # noqa: F811
    config = (f"registry: localhost\noperatorImage: {images['operator']}\nimagePullPolicy: Never\n"
              f"pull: {{allowedEndpoints: {{huggingface: ['{hub.url}']}}}}\n")
    with operator_process(kubeconfig, namespace, tmp_path, config) as process:
        yield process


def progress_lines(core, namespace: str, pod: str) -> list[dict]:
    lines = [json.loads(line) for line in core.read_namespaced_pod_log(pod, namespace).splitlines()
             if line.startswith("{")]
    return [line for line in lines if line.get("event") == "progress"]


def test_a_force_deleted_pull_pod_is_resumed_by_the_next_one(api_client, kubeconfig, namespace, operator, hub):
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    repo = hub.repos[MODEL]
    size = repo.files[BIG].size
    total = sum(f.size for f in repo.files.values())
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
        "resumable", model={"id": MODEL, "endpoint": hub.url}, replicas=0))

    samples: list[tuple[float, int]] = []     # (when, status.download.bytes)

    def status() -> dict:
        current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "resumable").get(
            "status") or {}
        samples.append((time.monotonic(), (current.get("download") or {}).get("bytes") or 0))
        return current

    def pull_pods(job: str) -> list:
        return [p for p in core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
                if not p.metadata.deletion_timestamp]

    started = time.monotonic()
    wait_for(lambda: status() and samples[-1][1] >= 0.4 * total, 240, "the status to show 40% of the file",
             detail=lambda: (samples[-3:], hub.bytes_sent))
    job = status()["download"]["job"]
    [first] = pull_pods(job)
    cut_bytes = samples[-1][1]
    cut_at = time.monotonic()
    requests_before_cut = len(hub.range_starts[BIG])
    assert first.status.phase == "Running" and hub.bytes_sent[BIG] < size, (first.status.phase, hub.bytes_sent)
    deleted = kubectl(kubeconfig, "-n", namespace, "delete", "pod", first.metadata.name, "--grace-period=0", "--force")
    assert deleted.returncode == 0, deleted.stderr
    hub.bandwidth = SLOWER_LINK

    second = wait_for(lambda: [p for p in pull_pods(job) if p.metadata.name != first.metadata.name
                               and p.status.phase == "Running"], 120, "the Job's next pod to run",
                      detail=lambda: [(p.metadata.name, p.status.phase) for p in pull_pods(job)])[0].metadata.name
    wait_for(lambda: status() and condition(custom, namespace, "resumable", "WeightsReady").get("status") == "True"
             and condition(custom, namespace, "resumable", "Ready").get("status") == "True", 300,
             "the weights to be in and the resource Ready", detail=lambda: (samples[-3:], status()))
    took = time.monotonic() - started
    final = status()

    # The Job's next pod finished the pull, at the hub's commit.
    assert final["resolvedRevision"] == repo.commit and final["phase"] == "Ready", final
    assert final["download"]["bytes"] == total
    result = json.loads(client.BatchV1Api(api_client).read_namespaced_job(job, namespace).metadata.annotations[
        "modeldeploy.io/pull-result"])
    assert result["commit"] == repo.commit and not result["cached"]

    # The hub's byte count: the file about once, and the new pod's requests resumed inside the begun segments.
    sent, starts = hub.bytes_sent[BIG], hub.range_starts[BIG]
    resumed = starts[requests_before_cut:]
    fresh_segments = {size * i // 4 for i in range(4)}    # --streams-per-file 4: the first pod's ranges
    print(f"hub sent {sent / size:.3f}x the file; ranges {starts}; status at the cut {cut_bytes}/{total}")
    assert sent <= 1.1 * size, f"the hub sent {sent / size:.2f}x the file"
    assert resumed and min(resumed) > 0 and not fresh_segments & set(resumed), (starts, requests_before_cut)
    assert result["downloaded_bytes"] <= total - cut_bytes + 0.05 * size, (result, cut_bytes)

    # The new pod's progress continued from the cut, and the status showed it.
    theirs = progress_lines(core, namespace, second)
    assert theirs and theirs[0]["bytes"] >= cut_bytes, (theirs[:2], cut_bytes)
    shown = {b for _, b in samples}
    assert any(line["bytes"] in shown for line in theirs if line["bytes"] < total), (theirs, samples)
    after = [b for when, b in samples if when >= cut_at]
    print(f"status download.bytes samples (MiB): {[round(b / 2**20) for _, b in samples]}; run {took:.0f}s")
    assert min(after) >= cut_bytes, f"the status fell back after the cut: {after}"
    assert all(a <= b for a, b in zip(after, after[1:])), f"the status went backwards: {after}"
