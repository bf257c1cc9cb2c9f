"""The sidecar's endpoint: the model server's own metrics, scraped over localhost at each scrape and passed on
unchanged, followed by the sidecar's: a black-box probe of the server (up, probe latency, consecutive failures),
the cache volume and the sidecar's own footprint. One scrape target per pod, whatever runs beside it."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from modeldeploy.monitor.collectors import CacheCollector, CgroupCollector

log = logging.getLogger("modeldeploy.monitor")


@dataclass
class MonitorOptions:
    target: str                      # the server, e.g. http://127.0.0.1:8080
    probe_path: str | None = "/v2/health/ready"   # None: a TCP connection is the probe (no health path)
    metrics_path: str = "/metrics"
    interval: float = 10.0
    timeout: float = 3.0
    cache_dir: Path | None = None
    snapshot: Path | None = None


class Monitor:
    def __init__(self, options: MonitorOptions):
        self.o = options
        self.registry = CollectorRegistry()
        r = self.registry
        self.up = Gauge("model_server_up", "1 when the server's health probe answered 2xx", registry=r)
        self.probe = Histogram("model_server_probe_duration_seconds", "Health probe round trip", registry=r,
                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.failures = Gauge("model_server_probe_consecutive_failures", "Failed probes in a row", registry=r)
        self.probes = Counter("model_server_probes", "Health probes by result", ["result"], registry=r)
        self.scrape_ok = Gauge("model_server_metrics_scrape_success", "1 when the server's /metrics was read",
                               registry=r)
        if options.cache_dir is not None:
            r.register(CacheCollector(options.cache_dir, options.snapshot))
        r.register(CgroupCollector())
        self.session: aiohttp.ClientSession | None = None

    async def probe_once(self) -> None:
        started = time.monotonic()
        try:
            if self.o.probe_path is None:
                ok = await self.connects()
            else:
                async with self.session.get(self.o.target + self.o.probe_path) as response:
                    await response.read()
                    ok = 200 <= response.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        self.probe.observe(time.monotonic() - started)
        self.up.set(1 if ok else 0)
        self.probes.labels("success" if ok else "failure").inc()
        self.failures.set(0 if ok else self.failures._value.get() + 1)

    async def connects(self) -> bool:
        target = urlsplit(self.o.target)
        _, writer = await asyncio.wait_for(asyncio.open_connection(target.hostname, target.port or 80),
                                           self.o.timeout)
        writer.close()
        await writer.wait_closed()
        return True

    async def probe_forever(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(self.o.interval)

    async def server_metrics(self) -> bytes:
        try:
            async with self.session.get(self.o.target + self.o.metrics_path) as response:
                if response.status == 200:
                    self.scrape_ok.set(1)
                    body = await response.read()
                    return body if body.endswith(b"\n") or not body else body + b"\n"
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        self.scrape_ok.set(0)
        return b""

    async def metrics(self, request: web.Request) -> web.Response:
        merged = await self.server_metrics() + generate_latest(self.registry)
        return web.Response(body=merged, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)

        async def lifecycle(app):
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.o.timeout))
            task = asyncio.get_running_loop().create_task(self.probe_forever())
            yield
            task.cancel()
            await self.session.close()

        app.cleanup_ctx.append(lifecycle)
        return app
