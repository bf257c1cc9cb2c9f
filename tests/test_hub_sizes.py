"""The operator's lookups of hub file sizes, against the local hub server, a closed port and a server that accepts
connections and never answers: a caller never waits (PENDING until the answer), an answer is remembered for a while,
no token and no redirect is ever followed, a listing is bounded in time and bytes, and only an endpoint that does not
answer at all is left alone for a while - a hub's refusal of one model (404, 400) concerns that model only.

Bad inputs tried: an unknown model, an id the hub refuses (400), a hub that never answers, a closed port, a redirect
to another host, a listing larger than the byte cap, a listing that is not JSON."""

from __future__ import annotations

import asyncio

from aiohttp import web

from modeldeploy.pull.selection import select
from modeldeploy.reconcile import hub_sizes
from modeldeploy.reconcile.hub_sizes import LISTING_SECONDS, PENDING, UNREACHABLE_SECONDS, HubSizes, Query
from tests.helpers import BlackHole, free_port, wait_for
from tests.hubserver import HubServer, Repo, RepoFile
from tests.models import MINILM, TINY_GGUF, build_gguf_llama, minilm_dir


def selected(sizes: HubSizes, endpoint: str, repo_id: str, revision: str, files: list[str] | None,
             allow_pickle: bool, gguf: bool = False):
    """What the hub is asked for a pull of these files (steps.hub_query builds the same from a spec)."""
    return sizes.ask(Query(endpoint, repo_id, revision, tuple(files) if files else None, allow_pickle, gguf))


def answer(sizes: HubSizes, *query, timeout: float = 30):
    """Asks until the lookup ends (the operator asks again on its next reconcile)."""
    first = selected(sizes, *query)
    if first is not PENDING:
        return first
    sizes.wait(timeout)
    return selected(sizes, *query)


def test_sizes_are_asked_once_without_a_token_and_a_refusal_concerns_one_model():
    folder = minilm_dir()
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    expected = sum((folder / name).stat().st_size for name in select(files, None, [], False))
    hub = HubServer()
    hub.add_repo(Repo.from_folder(MINILM, folder))
    hub.add_repo(Repo.from_folder("org/gated", folder, token="secret"))
    hub.start()
    now = [0.0]
    sizes = HubSizes(clock=lambda: now[0])
    try:
        assert selected(sizes, hub.url, MINILM, "main", None, False) is PENDING   # never waits
        sizes.wait(30)
        assert selected(sizes, hub.url, MINILM, "main", None, False) == expected
        assert answer(sizes, hub.url, MINILM, "main", ["*.json"], False) < expected
        assert hub.requests[("GET", "tree")] == 2
        now[0] += LISTING_SECONDS + 1                       # a branch can move: asked again after a while,
        assert selected(sizes, hub.url, MINILM, "main", None, False) == expected   # the old answer meanwhile
        sizes.wait(30)
        assert hub.requests[("GET", "tree")] == 3
        assert set(hub.auth_seen) == {None}                 # the operator sends no token, ever

        assert answer(sizes, hub.url, "org/gated", "main", None, False) is None    # 401 without a token
        assert answer(sizes, hub.url, "nobody/nothing", "main", None, False) is None   # 404
        # The hub's refusals concern those models: the endpoint is still asked for others.
        assert answer(sizes, hub.url, MINILM, "v9", None, False) is None
        before = hub.requests[("GET", "tree")]
        assert answer(sizes, hub.url, MINILM, "main", ["*.txt"], False) > 0
        assert hub.requests[("GET", "tree")] == before + 1
    finally:
        hub.stop()


def test_a_hub_that_never_answers_costs_one_bounded_lookup_and_is_then_left_alone():
    hole = BlackHole()
    now = [0.0]
    sizes = HubSizes(clock=lambda: now[0], timeout=1.0)
    try:
        assert selected(sizes, hole.url, "org/a", "main", None, False) is PENDING
        assert selected(sizes, hole.url, "org/b", "main", None, False) is PENDING
        wait_for(lambda: len(hole.held) == 2, 10, "both lookups to connect")
        sizes.wait(10)
        assert not sizes.running                            # the timeout ended both
        assert selected(sizes, hole.url, "org/c", "main", None, False) is None   # left alone
        assert len(hole.held) == 2
        now[0] += UNREACHABLE_SECONDS + 1
        assert selected(sizes, hole.url, "org/c", "main", None, False) is PENDING
    finally:
        hole.stop()
        sizes.wait(10)

    closed = f"http://127.0.0.1:{free_port()}"
    assert answer(sizes, closed, "org/a", "main", None, False) is None
    assert closed in sizes.unreachable


def test_no_redirect_is_followed_and_a_listing_is_bounded_in_bytes(monkeypatch):
    followed = []

    async def redirect(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def huge(request):
        return web.Response(body=b"[" + b" " * (hub_sizes.MAX_BYTES + 10) + b"]", content_type="application/json")

    async def garbage(request):
        return web.Response(text="<html>a captive portal</html>")

    async def slow(request):     # answers at once, then dribbles: slow, but it answers
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(40):
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    async def elsewhere(request):
        followed.append(request.path)
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/api/models/org/redirect/tree/main", redirect)
    app.router.add_get("/api/models/org/huge/tree/main", huge)
    app.router.add_get("/api/models/org/garbage/tree/main", garbage)
    app.router.add_get("/api/models/org/slow/tree/main", slow)
    app.router.add_get("/latest/meta-data/", elsewhere)
    server = HubServer()        # only for its thread and loop: serve this app instead of the hub's
    monkeypatch.setattr(server, "app", lambda: app)
    monkeypatch.setattr(hub_sizes, "BODY_SECONDS", 1.0)
    server.start()
    sizes = HubSizes()
    try:
        for model in ("org/redirect", "org/huge", "org/garbage", "org/slow"):
            assert answer(sizes, server.url, model, "main", None, False) is None, model
        assert followed == []
        assert server.url not in sizes.unreachable          # it answered: only those models are unknown
    finally:
        server.stop()


def test_a_cache_is_sized_only_from_the_endpoints_the_admin_allows():
    """Resources on one cache are sized together; one naming an endpoint the admin did not allow (it stalls) is
    left out, and that endpoint is never asked by the operator."""
    from modeldeploy.api import ModelDeploymentSpec
    from modeldeploy.config import OperatorConfig
    from modeldeploy.reconcile.children import Apis
    from modeldeploy.reconcile.steps import cache_needs, cache_user

    allowed, other = HubServer(), HubServer()
    for hub in (allowed, other):
        hub.add_repo(Repo.from_folder(MINILM, minilm_dir()))
        hub.start()
    allowed.add_repo(Repo.from_files("org/small", {"config.json": RepoFile("config.json", b'{"model_type": "bert"}')}))
    try:
        config = OperatorConfig(pull={"allowedEndpoints": {"huggingface": [allowed.url]}})
        specs = [ModelDeploymentSpec.model_validate({"model": {"id": model, "endpoint": url}})
                 for model, url in ((MINILM, allowed.url), (MINILM, other.url), ("org/small", allowed.url))]
        users = [cache_user(spec, config) for spec in specs]
        assert users[1] is None                                    # its endpoint is not allowed: it stalls
        users = [user for user in users if user is not None]
        apis = Apis.create()
        minilm = answer(HubSizes(), allowed.url, MINILM, "main", None, False)
        # Its own weights: a hub that answers within HUB_ANSWER_SECONDS is waited for (no "Sizing" and retry for
        # nothing). Another resource's: asked, not awaited (counted 0 until told; its own reconcile waits for it).
        assert cache_needs(users, config, apis, specs[0]) == minilm
        apis.hub_sizes.wait(30)
        assert cache_needs(users, config, apis, specs[0]) == minilm + len(b'{"model_type": "bert"}')
        assert allowed.requests[("GET", "tree")] == 3 and other.requests[("GET", "tree")] == 0
    finally:
        allowed.stop()
        other.stop()


def test_llamacpp_sizes_count_the_one_gguf_quantisation_it_pulls(tmp_path):
    for dtype in ("F32", "F16"):
        build_gguf_llama(tmp_path, dtype)
    readme = tmp_path / "README.md"
    readme.write_text("tiny\n")
    hub = HubServer()
    hub.add_repo(Repo.from_folder(TINY_GGUF, tmp_path))
    hub.start()
    try:
        sizes = HubSizes()
        f16 = (tmp_path / "tiny-llama-F16.gguf").stat().st_size
        assert answer(sizes, hub.url, TINY_GGUF, "main", None, False, True) == f16    # not F32, not the README
        assert answer(sizes, hub.url, TINY_GGUF, "main", None, False) == readme.stat().st_size   # others: README
        f32 = (tmp_path / "tiny-llama-F32.gguf").stat().st_size
        assert answer(sizes, hub.url, TINY_GGUF, "main", ["*F32*"], False, True) == f32   # chosen by pattern
    finally:
        hub.stop()
