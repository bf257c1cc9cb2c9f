"""The gateway's view of the cluster: a watch of the ModelDeployments and of their Services' Endpoints (ready pod
addresses), in the namespaces it serves, fed into the Gateway on its event loop; and the one write it makes, the
autoscaler's decision into a ModelDeployment's status.autoscaler. Watches run on threads (the kubernetes client is
synchronous); each lists first, then watches from that list's resourceVersion, and lists again when the watch
expires (410 Gone), so a missed event is repaired by the next list."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from modeldeploy.api import GROUP, PLURAL, VERSION
from modeldeploy.gateway.proxy import Gateway
from modeldeploy.gateway.routing import endpoints_key, model_from, ready_addresses
from modeldeploy.manifests.common import LABEL_COMPONENT, LABEL_MDEP

log = logging.getLogger("modeldeploy.gateway")
SERVER_ENDPOINTS = f"{LABEL_MDEP},{LABEL_COMPONENT}=server"
RETRY_SECONDS = 2


class ClusterView:
    def __init__(self, api_client: client.ApiClient, gateway: Gateway, namespaces: list[str]):
        self.gateway = gateway
        self.namespaces = namespaces or [None]
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listed: set = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for namespace in self.namespaces:
            for kind in ("models", "endpoints"):
                threading.Thread(target=self.watch_forever, args=(kind, namespace), daemon=True,
                                 name=f"watch-{kind}-{namespace or 'all'}").start()

    def list_and_watch_calls(self, kind: str, namespace: str | None):
        if kind == "models":
            if namespace:
                return (lambda **kw: self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kw))
            return lambda **kw: self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw)
        if namespace:
            return lambda **kw: self.core.list_namespaced_endpoints(namespace, label_selector=SERVER_ENDPOINTS, **kw)
        return lambda **kw: self.core.list_endpoints_for_all_namespaces(label_selector=SERVER_ENDPOINTS, **kw)

    def watch_forever(self, kind: str, namespace: str | None) -> None:
        call = self.list_and_watch_calls(kind, namespace)
        while True:
            try:
                listed = json.loads(call(_preload_content=False).data)
                self.post(self.replace, kind, namespace, listed["items"])
                version = listed["metadata"]["resourceVersion"]
                for event in watch.Watch().stream(call, resource_version=version, timeout_seconds=300):
                    if event["type"] == "ERROR":
                        break
                    self.post(self.one, kind, event["type"], event["raw_object"])
            except ApiException as error:
                if error.status != 410:
                    log.warning("watching %s in %s: %s %s", kind, namespace or "all namespaces", error.status,
                                error.reason)
                    time.sleep(RETRY_SECONDS)
            except Exception:
                log.exception("watching %s in %s failed; listing again", kind, namespace or "all namespaces")
                time.sleep(RETRY_SECONDS)

    def post(self, function, *args) -> None:
        self.loop.call_soon_threadsafe(function, *args)

    # -- on the event loop ---------------------------------------------------------------------------------------------
    def replace(self, kind: str, namespace: str | None, items: list[dict]) -> None:
        """A fresh list: what it lacks is gone."""
        if kind == "models":
            present = set()
            for item in items:
                self.one(kind, "ADDED", {**item, "kind": "ModelDeployment"})
                present.add((item["metadata"]["namespace"], item["metadata"]["name"]))
            for key in [k for k in self.gateway.models if (namespace is None or k[0] == namespace)
                        and k not in present]:
                self.gateway.drop_model(key)
        else:
            present = {endpoints_key(item) for item in items}
            for item in items:
                self.one(kind, "ADDED", item)
            for key, pool in list(self.gateway.pools.items()):
                if (namespace is None or key[0] == namespace) and key not in present and pool.addresses:
                    self.gateway.set_addresses(key, [])
        self.listed.add((kind, namespace))
        if len(self.listed) == 2 * len(self.namespaces):
            self.gateway.synced.set()

    def one(self, kind: str, type_: str, body: dict) -> None:
        if kind == "models":
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            model = model_from(body) if type_ != "DELETED" else None
            if model is None:
                self.gateway.drop_model(key)
            else:
                self.gateway.set_model(model)
        elif (key := endpoints_key(body)) is not None:
            self.gateway.set_addresses(key, [] if type_ == "DELETED" else ready_addresses(body))

    # -- the one write -------------------------------------------------------------------------------------------------
    async def write_status(self, namespace: str, name: str, fields: dict) -> None:
        """A merge patch of status.autoscaler alone (this gateway is its only writer; the operator's own status
        writes leave it be)."""
        await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL,
                                name, {"status": {"autoscaler": fields}})
