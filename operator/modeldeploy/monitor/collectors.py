"""What the sidecar measures itself: the cache volume and its container's cgroup. Each collector reads at scrape
time and reports nothing it cannot measure - no fake numbers. No GPUs: the sidecar requests none, so NVML in it
sees none; the builtin runtime exports them (serve/gpu.py), dcgm-exporter does for other engines."""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class CacheCollector:
    def __init__(self, cache_dir: Path, snapshot: Path | None):
        self.cache_dir = cache_dir
        self.snapshot = snapshot

    def collect(self):
        try:
            usage = shutil.disk_usage(self.cache_dir)
        except OSError:
            return
        used = GaugeMetricFamily("model_cache_used_bytes", "Bytes used on the model cache volume")
        used.add_metric([], usage.used)
        free = GaugeMetricFamily("model_cache_free_bytes", "Bytes free on the model cache volume")
        free.add_metric([], usage.free)
        yield used
        yield free
        if self.snapshot is not None and self.snapshot.is_dir():
            size = GaugeMetricFamily("model_size_bytes", "On-disk size of the served snapshot")
            size.add_metric([], sum(p.stat().st_size for p in self.snapshot.rglob("*") if p.is_file()))
            yield size


class CgroupCollector:
    """The sidecar container's own CPU and memory (cgroup v2, else v1): its footprint, on any architecture."""

    def __init__(self, root: Path = Path("/sys/fs/cgroup")):
        self.root = root

    def _read(self, *candidates: str) -> int | None:
        for candidate in candidates:
            try:
                text = (self.root / candidate).read_text().strip()
            except OSError:
                continue
            if candidate.endswith("cpu.stat"):
                fields = dict(line.split() for line in text.splitlines())
                return int(fields["usage_usec"]) * 1000 if "usage_usec" in fields else None
            return None if text == "max" else int(text)
        return None

    def collect(self):
        memory = self._read("memory.current", "memory/memory.usage_in_bytes")
        limit = self._read("memory.max", "memory/memory.limit_in_bytes")
        cpu_ns = self._read("cpu.stat", "cpuacct/cpuacct.usage")
        if memory is not None:
            family = GaugeMetricFamily("modeldeploy_monitor_memory_bytes", "The sidecar container's memory use")
            family.add_metric([], memory)
            yield family
        if limit is not None and limit < 2 ** 62:
            family = GaugeMetricFamily("modeldeploy_monitor_memory_limit_bytes", "The sidecar container's memory limit")
            family.add_metric([], limit)
            yield family
        if cpu_ns is not None:
            family = CounterMetricFamily("modeldeploy_monitor_cpu_seconds", "The sidecar container's CPU time")
            family.add_metric([], cpu_ns / 1e9)
            yield family
