"""How large a cache PVC to ask for when the user gave no size: the bytes the hub lists for the selected files
(reconcile/hub_sizes.py asks), plus headroom."""

from __future__ import annotations

import math

HEADROOM = 1.25            # room for a second revision's changed files and partial downloads
MINIMUM_GIB = 1


def claim_size(nbytes: int) -> str:
    return f"{max(MINIMUM_GIB, math.ceil(nbytes * HEADROOM / 2**30))}Gi"
