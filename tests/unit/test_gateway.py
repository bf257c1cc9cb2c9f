"""The gateway's decisions and its HTTP side, against real aiohttp servers on 127.0.0.1 standing in for model pods:
routing on `model`, least-in-flight balancing, streams passed on unbuffered, holding while no replica is ready, and
the autoscaler's recommendations. The operator's half (spec.autoscaling -> replicas) is checked on the types.

Bad inputs tried: a body that is no JSON, a JSON array, no `model`, a number as `model`, an unknown model, a name in
two namespaces, a body over the size limit, more held requests than the queue takes, a hold that times out, a
replica that refuses connections, a stream its server cuts, a server slower than the request timeout, maxReplicas
below minReplicas."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp import web

from modeldeploy.api import Autoscaling, ModelDeploymentSpec
from modeldeploy.config import OperatorConfig
from modeldeploy.gateway.autoscaler import Recommender
from modeldeploy.gateway.proxy import Gateway, Options
from modeldeploy.gateway.routing import (Model, least_in_flight, model_from, public_names, ready_addresses,
                                         resolve)


# -- pure decisions -------------------------------------------------------------------------------------------------
def test_names_resolve_bare_when_unique_and_qualified_always():
    keys = {("a", "minilm"), ("b", "minilm"), ("a", "qwen")}
    assert resolve(keys, "qwen") == (("a", "qwen"), [])
    assert resolve(keys, "b/minilm") == (("b", "minilm"), [])
    assert resolve(keys, "minilm") == (None, ["a/minilm", "b/minilm"])
    assert resolve(keys, "nope") == (None, []) and resolve(keys, "c/qwen") == (None, [])
    assert public_names(keys) == {("a", "minilm"): "a/minilm", ("b", "minilm"): "b/minilm", ("a", "qwen"): "qwen"}


def test_least_in_flight_picks_the_idlest_and_rotates_ties():
    addresses = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    assert least_in_flight(addresses, {"10.0.0.1:8080": 2, "10.0.0.2:8080": 1, "10.0.0.3:8080": 3}) == "10.0.0.2:8080"
    assert [least_in_flight(addresses, {}, start) for start in range(3)] == addresses


def test_ready_addresses_take_the_http_port_and_skip_not_ready_ones():
    endpoints = {"subsets": [{"addresses": [{"ip": "10.244.0.9"}, {"ip": "10.244.0.7"}],
                              "notReadyAddresses": [{"ip": "10.244.0.8"}],
                              "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}]}]}
    assert ready_addresses(endpoints) == ["10.244.0.7:8080", "10.244.0.9:8080"]
    assert ready_addresses({"subsets": None}) == []


def test_a_model_deployment_becomes_a_route():
    body = {"metadata": {"namespace": "ns", "name": "m", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"model": {"id": "org/x"}, "autoscaling": {"maxReplicas": 3, "minReplicas": 0}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "desiredReplicas": 2,
                       "autoscaler": {"desiredReplicas": 2}}}
    model = model_from(body)
    assert (model.key, model.served_as, model.ready, model.stalled, model.current_replicas()) == (
        ("ns", "m"), "org/x", True, None, 2)
    stalled = {**body, "status": {"conditions": [{"type": "Stalled", "status": "True", "message": "bad profile"}]}}
    assert model_from(stalled).stalled == "bad profile" and model_from(stalled).current_replicas() == 0
    assert model_from({**body, "spec": {"model": {"id": "not a repo"}}}) is None


SPEC = Autoscaling(min_replicas=1, max_replicas=4, target_in_flight=2, scale_up_seconds=10,
                   scale_down_delay_seconds=30)


def run_recommender(loads: list[float], current: int, spec: Autoscaling = SPEC) -> list[int]:
    """One load a second; the replica count after each (a decision is taken at once)."""
    recommender, counts = Recommender(started=0.0), []
    for second, load in enumerate(loads, start=1):
        decision = recommender.decide(float(second), load, spec, current)
        current = decision.replicas if decision else current
        counts.append(current)
    return counts


def test_scale_up_waits_for_the_whole_window_and_takes_its_lowest_ask():
    counts = run_recommender([10.0] * 9 + [5.0] + [10.0] * 11, current=1)
    assert counts[:9] == [1] * 9              # 10 s not seen yet
    assert counts[9:20] == [3] * 11           # the lowest ask of the window: ceil(5 / 2), while it is in it
    assert counts[20] == 4                    # then ceil(10 / 2) = 5, within maxReplicas


def test_one_burst_does_not_scale_and_quiet_goes_down_only_after_the_delay():
    assert run_recommender([1.0] * 12 + [20.0] + [1.0] * 12, current=1) == [1] * 25
    counts = run_recommender([0.0] * 40, current=4)
    assert counts[:29] == [4] * 29 and counts[29:] == [1] * 11     # after 30 s, to minReplicas


def test_scale_to_zero_and_back_at_once_on_demand():
    spec = Autoscaling(min_replicas=0, max_replicas=2, target_in_flight=1, scale_up_seconds=60,
                       scale_down_delay_seconds=5)
    counts = run_recommender([0.0] * 6 + [0.3], current=1, spec=spec)
    assert counts == [1, 1, 1, 1, 0, 0, 1]   # idle 5 s: zero; a request waiting: one replica, no 60 s window


def test_bounds_that_move_are_applied():
    assert run_recommender([0.0], current=9) == [4]
    assert run_recommender([0.0], current=0) == [1]


def test_the_operator_runs_the_gateways_decision_within_bounds_and_ignores_spec_replicas():
    spec = ModelDeploymentSpec.model_validate({"model": {"id": "a/b"}, "replicas": 7,
                                               "autoscaling": {"minReplicas": 0, "maxReplicas": 3}})
    assert spec.wanted_replicas(None) == 0
    assert spec.wanted_replicas({"autoscaler": {"desiredReplicas": 2}}) == 2
    assert spec.wanted_replicas({"autoscaler": {"desiredReplicas": 9}}) == 3
    assert spec.wanted_replicas({"autoscaler": {"desiredReplicas": True}}) == 0
    plain = ModelDeploymentSpec.model_validate({"model": {"id": "a/b"}, "replicas": 7})
    assert plain.wanted_replicas({"autoscaler": {"desiredReplicas": 2}}) == 7      # an HPA's spec.replicas rules
    bad = ModelDeploymentSpec.model_validate({"model": {"id": "a/b"},
                                              "autoscaling": {"minReplicas": 3, "maxReplicas": 2}})
    assert any("maxReplicas (2) is below spec.autoscaling.minReplicas (3)" in p for p in bad.problems(OperatorConfig()))


# -- the HTTP side, against real servers -------------------------------------------------------------------------------
class Backend:
    """A model pod's stand-in: answers OpenAI routes naming itself and the model it was asked for; requests can be
    held at a gate; streams send a chunk per release of the gate."""

    def __init__(self, name: str):
        self.name, self.seen, self.in_flight = name, [], 0
        self.timing = ""                # a Server-Timing header of the server's own
        self.gate = asyncio.Event()
        self.gate.set()
        self.chunks: asyncio.Queue = asyncio.Queue()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self.address

    async def embeddings(self, request):
        body = await request.json()
        self.seen.append(body)
        self.in_flight += 1
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        if body.get("input") == "fail":
            return web.json_response({"error": {"message": "bad", "type": "x", "param": None, "code": 400}},
                                     status=400)
        return web.json_response({"object": "list", "server": self.name, "model": body["model"]},
                                 headers={"Server-Timing": self.timing} if self.timing else None)

    async def chat(self, request):
        self.seen.append(await request.json())
        await self.gate.wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while (chunk := await self.chunks.get()) is not None:
            if chunk == "cut":                  # the pod dies mid-stream
                request.transport.close()
                return response
            await response.write(f"data: {chunk}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


async def serve(gateway: Gateway):
    runner = web.AppRunner(gateway.build_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def with_gateway(scenario, options: Options = Options(), writes: list | None = None):
    async def main():
        async def record(namespace, name, fields):
            writes.append((namespace, name, fields))

        gateway = Gateway(options, write_status=record if writes is not None else None)
        runner, url = await serve(gateway)
        try:
            async with aiohttp.ClientSession() as client:
                return await scenario(gateway, url, client)
        finally:
            await runner.cleanup()
    return asyncio.run(main())


async def post(client, url, body, path="/v1/embeddings"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with client.post(url + path, data=data) as response:
        return response.status, await response.json(), response.headers


def test_two_models_answered_by_name_unknown_404_and_bad_bodies_400():
    async def scenario(gateway, url, client):
        a, b = Backend("a"), Backend("b")
        gateway.set_model(Model("ns", "alpha", "org/alpha", ready=True))
        gateway.set_model(Model("ns", "beta", "org/beta", ready=True))
        gateway.set_model(Model("ns", "pulling", "org/p", ready=False))
        gateway.set_addresses(("ns", "alpha"), [await a.start()])
        gateway.set_addresses(("ns", "beta"), [await b.start()])
        async with client.get(url + "/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["alpha", "beta"]   # Ready ones only
        status, body, _ = await post(client, url, {"model": "alpha", "input": "x"})
        assert status == 200 and body == {"object": "list", "server": "a", "model": "org/alpha"}
        status, body, _ = await post(client, url, {"model": "ns/beta", "input": "x"})
        assert status == 200 and body["server"] == "b"
        status, body, _ = await post(client, url, {"model": "alpha", "input": "fail"})
        assert status == 400 and body["error"]["message"] == "bad"        # the server's own answer, passed on
        refusals = []
        for bad in ({"model": "gamma", "input": "x"}, b"{not json", b"[1]", {"input": "x"}, {"model": 5}):
            status, body, _ = await post(client, url, bad)
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == status
            refusals.append((status, body["error"]["type"]))
        assert refusals == [(404, "model_not_found")] + [(400, "invalid_request_error")] * 4
        status, body, _ = await post(client, url, {"model": "alpha", "input": "x" * 5000})
        assert status == 413 and body["error"]["type"] == "request_too_large"
        assert len(a.seen) == 2 and len(b.seen) == 1                       # nothing refused reached a server
        metrics = await (await client.get(url + "/metrics")).text()
        assert 'modeldeploy_gateway_requests_total{code="404",endpoint="/v1/embeddings",model_name="",namespace=""}' \
            in metrics
        assert 'modeldeploy_gateway_requests_total{code="200",endpoint="/v1/embeddings",model_name="alpha",' \
               'namespace="ns"} 1.0' in metrics

    with_gateway(scenario, Options(max_body_bytes=4096))


def test_server_timing_gives_the_servers_share_of_an_answer_after_the_servers_own():
    async def scenario(gateway, url, client):
        slow = Backend("slow")
        gateway.set_model(Model("ns", "m", "org/m", ready=True))
        gateway.set_addresses(("ns", "m"), [await slow.start()])
        slow.gate.clear()
        started = time.monotonic()
        answer = asyncio.ensure_future(post(client, url, {"model": "m", "input": "x"}))
        while not slow.in_flight:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)                # the server holds the request 0.3 s at least
        slow.gate.set()
        status, _, headers = await answer
        total_ms = (time.monotonic() - started) * 1000
        name, _, duration = headers["Server-Timing"].partition(";dur=")
        assert status == 200 and name == "upstream" and 300 <= float(duration) <= total_ms
        slow.timing = "serve;dur=12.5"          # modeldeploy serve's own entry goes first
        _, _, headers = await post(client, url, {"model": "m", "input": "x"})
        server, gateway = headers["Server-Timing"].split(", ")
        assert server == "serve;dur=12.5" and gateway.startswith("upstream;dur=")

    with_gateway(scenario)


def test_requests_go_to_the_replica_with_the_fewest_in_flight():
    async def scenario(gateway, url, client):
        one, other = Backend("one"), Backend("other")
        gateway.set_model(Model("ns", "m", "org/m", ready=True))
        gateway.set_addresses(("ns", "m"), [await one.start(), await other.start()])
        one.gate.clear()
        other.gate.clear()
        first = asyncio.ensure_future(post(client, url, {"model": "m", "input": "x"}))
        while not (one.in_flight or other.in_flight):
            await asyncio.sleep(0.01)
        busy, idle = (one, other) if one.in_flight else (other, one)
        idle.gate.set()
        answers = [await asyncio.wait_for(post(client, url, {"model": "m", "input": "x"}), 5) for _ in range(5)]
        assert {body["server"] for _, body, _ in answers} == {idle.name}   # round-robin would send 2 to the busy one
        busy.gate.set()
        assert (await first)[1]["server"] == busy.name

    with_gateway(scenario)


def test_a_stream_is_passed_on_chunk_by_chunk_and_a_cut_one_ends_with_the_error():
    async def scenario(gateway, url, client):
        backend = Backend("s")
        gateway.set_model(Model("ns", "gen", "org/gen", ready=True))
        gateway.set_addresses(("ns", "gen"), [await backend.start()])
        async with client.post(url + "/v1/chat/completions",
                               json={"model": "gen", "stream": True, "messages": []}) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            for n in range(3):
                await backend.chunks.put(json.dumps({"n": n}))
                line = await asyncio.wait_for(response.content.readline(), 5)   # before the next chunk exists
                assert json.loads(line.decode().removeprefix("data: ")) == {"n": n}
                assert await response.content.readline() == b"\n"
            await backend.chunks.put(None)
            assert await response.content.read() == b"data: [DONE]\n\n"
        async with client.post(url + "/v1/chat/completions",
                               json={"model": "gen", "stream": True, "messages": []}) as response:
            await backend.chunks.put(json.dumps({"n": 0}))
            assert await asyncio.wait_for(response.content.readline(), 5) == b'data: {"n": 0}\n'
            await backend.chunks.put("cut")
            rest = (await asyncio.wait_for(response.content.read(), 5)).decode()
            error = json.loads(rest.strip().removeprefix("data: "))["error"]
            assert error["type"] == "bad_gateway" and "mid-stream" in error["message"]

    with_gateway(scenario)


def test_a_client_gone_before_its_stream_starts_is_not_sent_to_another_replica():
    async def scenario(gateway, url, client):
        backends = [Backend("one"), Backend("other")]
        gateway.set_model(Model("ns", "gen", "org/gen", ready=True))
        gateway.set_addresses(("ns", "gen"), [await b.start() for b in backends])
        for backend in backends:
            backend.gate.clear()
        asking = asyncio.ensure_future(client.post(url + "/v1/chat/completions",
                                                   json={"model": "gen", "stream": True, "messages": []}))
        while not any(b.seen for b in backends):
            await asyncio.sleep(0.01)
        asking.cancel()                          # the client goes away before the server's first byte
        await asyncio.gather(asking, return_exceptions=True)
        for backend in backends:
            backend.gate.set()
            await backend.chunks.put(None)
        while any(gateway.pools[("ns", "gen")].in_flight.values()):
            await asyncio.sleep(0.01)
        assert sum(len(b.seen) for b in backends) == 1

    with_gateway(scenario)


def test_a_replica_refusing_connections_gives_way_to_the_next():
    async def scenario(gateway, url, client):
        backend = Backend("alive")
        gone = "127.0.0.1:9"            # the discard port: nothing listens
        gateway.set_model(Model("ns", "m", "org/m", ready=True))
        gateway.set_addresses(("ns", "m"), [gone, await backend.start()])
        answers = [await post(client, url, {"model": "m", "input": "x"}) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200] * 4
        gateway.set_addresses(("ns", "m"), [gone])
        status, body, _ = await post(client, url, {"model": "m", "input": "x"})
        assert status == 502 and body["error"]["type"] == "bad_gateway"

    with_gateway(scenario)


def test_held_while_at_zero_the_autoscaler_asks_for_one_and_all_are_answered():
    writes: list = []

    async def scenario(gateway, url, client):
        backend = Backend("cold")
        spec = Autoscaling(min_replicas=0, max_replicas=2, target_in_flight=4, scale_down_delay_seconds=60)
        gateway.set_model(Model("ns", "m", "org/m", ready=True, autoscaling=spec, desired=0, running=0))
        held = [asyncio.ensure_future(post(client, url, {"model": "m", "input": str(i)})) for i in range(5)]
        while gateway.pools[("ns", "m")].held < 5:
            await asyncio.sleep(0.01)
        gateway.autoscale_once(time.monotonic())
        await asyncio.sleep(0.05)
        assert writes[0][:2] == ("ns", "m") and writes[0][2]["desiredReplicas"] == 1
        assert "no replica runs" in writes[0][2]["reason"]
        assert not any(h.done() for h in held)
        gateway.set_addresses(("ns", "m"), [await backend.start()])       # the replica is Ready
        answers = await asyncio.gather(*held)
        assert [status for status, _, _ in answers] == [200] * 5
        await asyncio.sleep(0.05)
        assert "coldStartSeconds" in writes[-1][2]

    with_gateway(scenario, writes=writes)


def test_holding_is_bounded_in_number_and_time():
    async def scenario(gateway, url, client):
        gateway.set_model(Model("ns", "m", "org/m", ready=True))
        held = [asyncio.ensure_future(post(client, url, {"model": "m", "input": "x"})) for _ in range(2)]
        while gateway.pools[("ns", "m")].held < 2:
            await asyncio.sleep(0.01)
        status, body, headers = await post(client, url, {"model": "m", "input": "x"})
        assert status == 503 and headers["Retry-After"] and "already wait" in body["error"]["message"]
        for status, body, headers in await asyncio.gather(*held):
            assert status == 503 and headers["Retry-After"] and "became ready within 0.3 s" in body["error"]["message"]

    with_gateway(scenario, Options(max_held=2, hold_timeout=0.3))


def test_a_server_past_the_request_timeout_is_a_504_and_its_connection_is_not_reused():
    async def scenario(gateway, url, client):
        backend = Backend("slow")
        gateway.set_model(Model("ns", "m", "org/m", ready=True))
        address = await backend.start()
        gateway.set_addresses(("ns", "m"), [address])
        backend.gate.clear()
        status, body, _ = await post(client, url, {"model": "m", "input": "x"})
        assert status == 504 and body["error"]["type"] == "timeout" and "0.3 s" in body["error"]["message"]
        assert not gateway.upstreams.idle.get(address)      # mid-answer: closed, not given back
        backend.gate.set()
        assert (await post(client, url, {"model": "m", "input": "x"}))[0] == 200

    with_gateway(scenario, Options(request_timeout=0.3))


def test_a_fresh_list_replaces_what_the_watch_knew():
    from kubernetes import client

    from modeldeploy.gateway.kube import ClusterView

    def mdep(name):
        return {"metadata": {"namespace": "ns", "name": name}, "spec": {"model": {"id": f"org/{name}"}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}

    def endpoints(name, *ips):
        return {"metadata": {"namespace": "ns", "name": name, "labels": {"modeldeploy.io/model-deployment": name}},
                "subsets": [{"addresses": [{"ip": ip} for ip in ips], "ports": [{"name": "http", "port": 8080}]}]}

    async def scenario():
        gateway = Gateway()
        view = ClusterView(client.ApiClient(), gateway, ["ns"])
        view.replace("models", "ns", [mdep("a"), mdep("b")])
        assert not gateway.synced.is_set()                 # the endpoints are not listed yet
        view.replace("endpoints", "ns", [endpoints("a", "10.0.0.1"), endpoints("b", "10.0.0.2")])
        assert gateway.synced.is_set() and sorted(gateway.models) == [("ns", "a"), ("ns", "b")]
        view.one("endpoints", "MODIFIED", endpoints("a", "10.0.0.1", "10.0.0.3"))
        assert gateway.pools[("ns", "a")].addresses == ["10.0.0.1:8080", "10.0.0.3:8080"]
        view.replace("models", "ns", [mdep("a")])           # b was deleted while the watch was down
        view.replace("endpoints", "ns", [endpoints("a", "10.0.0.1")])
        assert sorted(gateway.models) == [("ns", "a")] and gateway.pools[("ns", "b")].addresses == []
        assert gateway.pools[("ns", "a")].addresses == ["10.0.0.1:8080"]
        view.one("models", "DELETED", mdep("a"))
        assert not gateway.models

    asyncio.run(scenario())
