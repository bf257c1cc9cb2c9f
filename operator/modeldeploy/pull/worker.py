"""One download attempt, run in a child process so that the supervisor (puller.py) can cut it off when it stalls
or runs past the deadline: a blocked socket read cannot be interrupted from another thread, a process can be killed.
Downloading, resuming (`*.incomplete` files), the cache layout and per-blob locking are huggingface_hub's."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from modeldeploy.pull.errors import PullError, Reason, classify
from modeldeploy.pull.integrity import Expected, IntegrityFailure, verify


@dataclass
class Plan:
    repo_id: str
    commit: str
    cache_dir: str
    endpoint: str
    files: list[Expected]
    timeout: float
    workers: int
    token: str | None = field(default=None, repr=False)


def configure_hub_client(timeout: float) -> None:
    """huggingface_hub reads these at import: set them first. Plain HTTP (no Xet CAS), no progress bars (the
    supervisor reports progress), no telemetry."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = str(math.ceil(timeout))   # parsed as int
    os.environ["HF_HUB_ETAG_TIMEOUT"] = str(math.ceil(timeout))


def download_and_verify(plan: Plan, expected: Expected) -> str:
    from huggingface_hub import hf_hub_download

    try:
        link = Path(hf_hub_download(plan.repo_id, expected.path, revision=plan.commit, cache_dir=plan.cache_dir,
                                    endpoint=plan.endpoint, token=plan.token or False))
    except Exception as error:  # classified: the supervisor decides whether to retry
        raise classify(error, expected.path) from None
    blob = link.resolve()
    try:
        return verify(blob, expected, blob.name)
    except IntegrityFailure as failure:
        # Drop the bad blob and its link so the next attempt fetches it again.
        link.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise PullError(Reason.INTEGRITY, str(failure)) from None


def run(plan: Plan, results) -> None:
    """Child process entry point: puts ("ok", {path: check}) or ("error", reason, message, retry_after)."""
    configure_hub_client(plan.timeout)
    try:
        with ThreadPoolExecutor(max_workers=max(1, plan.workers)) as pool:
            checks = dict(zip([f.path for f in plan.files],
                              pool.map(lambda f: download_and_verify(plan, f), plan.files)))
        results.put(("ok", checks))
    except PullError as error:
        results.put(("error", error.reason.value, error.message, error.retry_after))
    except BaseException as error:  # anything unexpected still reaches the supervisor, classified
        failure = classify(error, plan.repo_id)
        results.put(("error", failure.reason.value, failure.message, failure.retry_after))
