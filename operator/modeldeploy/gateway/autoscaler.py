"""Replicas from load, decided where every request is seen. Each tick the gateway hands in the mean number of a
model's requests in it (forwarded and held) since the last tick; the recommendation is ceil(load / targetInFlight)
within the bounds. As an HPA's behaviour does it: a scale-up needs every recommendation of the last
`scaleUpSeconds` to ask for more (the lowest of them is taken), a scale-down every one of the last
`scaleDownDelaySeconds` to ask for fewer (the highest is taken), so one burst or one quiet second moves nothing.
A model at zero with a request waiting goes to one at once: that request is held until a replica is Ready."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from modeldeploy.api import Autoscaling


@dataclass
class Decision:
    replicas: int
    reason: str


@dataclass
class Recommender:
    """One model's recent recommendations (time, replicas) and when it started watching (a window it has not seen
    whole yet decides nothing)."""
    started: float
    history: collections.deque = field(default_factory=collections.deque)

    def decide(self, now: float, load: float, spec: Autoscaling, current: int) -> Decision | None:
        """A new replica count and why, or None to stay at `current`."""
        raw = spec.clamp(math.ceil(load / spec.target_in_flight - 1e-9))
        self.history.append((now, raw))
        keep = max(spec.scale_up_seconds, spec.scale_down_delay_seconds)
        while self.history and self.history[0][0] < now - keep:
            self.history.popleft()
        measured = f"{load:.1f} requests in flight, target {spec.target_in_flight:g} per replica"
        if current == 0 and load > 0:
            return Decision(max(raw, 1), f"{measured}: a request is waiting and no replica runs")
        if spec.clamp(current) != current:      # the bounds moved
            return Decision(spec.clamp(current), f"replicas kept within [{spec.min_replicas}, {spec.max_replicas}]")
        up = self.window(now, spec.scale_up_seconds)
        if up and min(up) > current:
            return Decision(min(up), f"{measured}: at least {min(up)} replicas asked for over "
                                     f"{spec.scale_up_seconds} s")
        down = self.window(now, spec.scale_down_delay_seconds)
        if down and max(down) < current:
            return Decision(max(down), f"{measured}: at most {max(down)} replicas asked for over "
                                       f"{spec.scale_down_delay_seconds} s")
        return None

    def window(self, now: float, seconds: int) -> list[int]:
        """The recommendations of the last `seconds`, or [] while the recommender has watched for less."""
        if now - self.started < seconds:
            return []
        return [replicas for at, replicas in self.history if at >= now - seconds]
