"""One download attempt, run in a child process so that the supervisor (puller.py) can cut it off when it stalls
or runs past the deadline: a blocked socket read cannot be interrupted from another thread, a process can be killed.
Each file goes through `transfer.BlobTransfer` (stable partial files, per-blob locks, ranged pieces), so whatever
an attempt fetched before it was killed is still there for the next one."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from modeldeploy.pull.errors import classify
from modeldeploy.pull.integrity import Expected


@dataclass
class Plan:
    repo_id: str
    commit: str
    cache_dir: str
    endpoint: str
    files: list[Expected]
    timeout: float
    workers: int
    streams_per_file: int = 4
    streams: int = 8
    split_size: int = 64 << 20
    reclaim_after: float = 60.0
    keep: set[str] = field(default_factory=set)       # blob names of the whole pull: their partials are resumed
    token: str | None = field(default=None, repr=False)


def configure_hub_client(timeout: float) -> None:
    """huggingface_hub reads these at import: set them first. Plain HTTP (no Xet CAS), no progress bars (the
    supervisor reports progress), no telemetry."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = str(math.ceil(timeout))   # parsed as int
    os.environ["HF_HUB_ETAG_TIMEOUT"] = str(math.ceil(timeout))


def run(plan: Plan, results) -> None:
    """Child process entry point. Puts ("reclaimed", files, bytes), then ("file", path, check, received) as each
    file is in the snapshot, then ("ok",) or ("error", reason, message, retry_after)."""
    configure_hub_client(plan.timeout)
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from modeldeploy.pull import transfer

    # http_get hands over 10 MiB at a time: on a slow link that is minutes without a visible byte (a false stall)
    # and up to 10 MiB per stream lost to a kill. 1 MiB keeps both small.
    constants.DOWNLOAD_CHUNK_SIZE = transfer.WRITE_CHUNK
    try:
        results.put(("reclaimed", *transfer.reclaim(plan.cache_dir, plan.repo_id, plan.keep, plan.reclaim_after)))
        headers = build_hf_headers(token=plan.token or False, library_name="modeldeploy")
        streams = transfer.Streams(per_file=plan.streams_per_file, split_size=plan.split_size,
                                   total=threading.BoundedSemaphore(plan.streams))

        def one(f: Expected) -> None:
            received = [0]
            lock = threading.Lock()

            def counter(n: int) -> None:
                with lock:
                    received[0] += n

            url = hf_hub_url(plan.repo_id, f.path, revision=plan.commit, endpoint=plan.endpoint)
            try:
                check = transfer.BlobTransfer(plan.cache_dir, plan.repo_id, plan.commit, f, url, headers, streams,
                                              counter).run()
            except Exception as error:   # classified: the supervisor decides whether to retry
                raise classify(error, f.path) from None
            results.put(("file", f.path, check, received[0]))

        pool = ThreadPoolExecutor(max_workers=max(1, plan.workers))
        for future in as_completed([pool.submit(one, f) for f in plan.files]):
            future.result()      # the first failure ends the attempt now, not when the other files are done
        results.put(("ok",))
    except BaseException as error:  # anything unexpected still reaches the supervisor, classified
        failure = classify(error, plan.repo_id)
        results.put(("error", failure.reason.value, failure.message, failure.retry_after))
    results.close()
    results.join_thread()
    os._exit(0)   # other transfers of a failed attempt stop here; their partials are resumed by the next one
