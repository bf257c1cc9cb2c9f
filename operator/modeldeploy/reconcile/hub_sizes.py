"""The sizes a hub lists for a model's selected files, asked once and remembered. Reconciles repeat (each child event,
each progress refresh) and an unreachable hub costs huggingface_hub's retries, about 24 s a lookup. Sizing is a
courtesy, so an endpoint that cannot be reached is left alone for a while, for every model on it."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Callable

from huggingface_hub.errors import HfHubHTTPError

from modeldeploy.pull.sizing import listed_bytes

log = logging.getLogger("modeldeploy.operator")

LISTING_SECONDS = 600        # how long a listing (or a hub's refusal) is trusted: a branch can move
UNREACHABLE_SECONDS = 300    # how long an endpoint that could not be reached is not asked again


class HubSizes:
    def __init__(self, clock: Callable[[], float] = time.monotonic, lister: Callable[..., int] = listed_bytes):
        self.clock = clock
        self.lister = lister
        self.listings: dict[tuple, tuple[float, int | None]] = {}     # key -> (when, bytes or None)
        self.unreachable: dict[str, float] = {}                       # endpoint -> since when
        self.lock = threading.Lock()

    def selected_bytes(self, spec, endpoint: str, token: str | None) -> int | None:
        """Bytes of the selected files; None when the hub cannot tell (unreachable, refused, unknown model): the
        pull itself then reports what is wrong."""
        model = spec.model
        key = (endpoint, model.id, model.revision, tuple(model.files or ()), model.allow_pickle,
               hashlib.sha256(token.encode()).hexdigest() if token else None)    # another token may see more
        now = self.clock()
        with self.lock:
            if now - self.unreachable.get(endpoint, -UNREACHABLE_SECONDS) < UNREACHABLE_SECONDS:
                return None
            if key in self.listings and now - self.listings[key][0] < LISTING_SECONDS:
                return self.listings[key][1]
        try:
            nbytes = self.lister(endpoint, model.id, model.revision, model.files, model.allow_pickle, token)
        except HfHubHTTPError as error:     # the hub answered: unknown model or revision, token refused, ...
            log.info("the hub %s lists no sizes for %s (%s)", endpoint, model.id, str(error).splitlines()[0][:200])
            nbytes = None
        except Exception as error:          # no answer at all: the endpoint is unreachable from the operator
            log.info("hub %s unreachable (%s: %s); cache sizing skips it for %d s", endpoint, type(error).__name__,
                     str(error)[:200], UNREACHABLE_SECONDS)
            with self.lock:
                self.unreachable[endpoint] = self.clock()
            return None
        with self.lock:
            self.listings[key] = (self.clock(), nbytes)
        return nbytes
