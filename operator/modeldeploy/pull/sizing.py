"""How large a cache PVC to ask for when the user gave no size: the bytes the hub lists for the selected files,
plus headroom, read the same way the puller reads them (same file selection)."""

from __future__ import annotations

import math

from modeldeploy.pull.selection import select

HEADROOM = 1.25            # room for a second revision's changed files and huggingface_hub's temporary files
MINIMUM_GIB = 1


def listed_bytes(endpoint: str, repo_id: str, revision: str, patterns: list[str] | None, allow_pickle: bool,
                 token: str | None) -> int:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token or False)
    entries = {e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True)
               if isinstance(e, RepoFile)}
    return sum(entries[p].size for p in select(list(entries), patterns, [], allow_pickle))


def claim_size(nbytes: int) -> str:
    return f"{max(MINIMUM_GIB, math.ceil(nbytes * HEADROOM / 2**30))}Gi"
