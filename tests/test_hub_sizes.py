"""The operator's memory of hub file sizes, against the local hub server and a closed port: a listing is asked once
and trusted for a while, a hub's refusal (unknown model) too, and an unreachable endpoint costs one lookup (with
huggingface_hub's own retries) and is then skipped for every model on it until its pause is over."""

from __future__ import annotations

from modeldeploy.pull.selection import select
from modeldeploy.pull.sizing import listed_bytes
from modeldeploy.reconcile.hub_sizes import LISTING_SECONDS, UNREACHABLE_SECONDS, HubSizes
from modeldeploy.render import parse_spec
from tests.helpers import free_port
from tests.hubserver import HubServer, Repo
from tests.models import MINILM, minilm_dir


def spec(model_id: str):
    return parse_spec({"spec": {"model": {"id": model_id}, "task": "feature-extraction"}})


def test_sizes_are_asked_once_and_an_unreachable_hub_is_left_alone():
    folder = minilm_dir()
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    expected = sum((folder / name).stat().st_size for name in select(files, None, [], False))
    hub = HubServer()
    hub.add_repo(Repo.from_folder(MINILM, folder))
    hub.start()
    now = [0.0]
    asked: list[tuple[str, str]] = []

    def counted_lister(endpoint, repo_id, *rest):
        asked.append((endpoint, repo_id))
        return listed_bytes(endpoint, repo_id, *rest)

    sizes = HubSizes(clock=lambda: now[0], lister=counted_lister)
    try:
        minilm, unknown = spec(MINILM), spec("nobody/nothing")
        assert sizes.selected_bytes(minilm, hub.url, None) == expected
        assert sizes.selected_bytes(minilm, hub.url, None) == expected
        assert hub.requests[("GET", "tree")] == 1
        now[0] += LISTING_SECONDS + 1                       # a branch can move: asked again after a while
        assert sizes.selected_bytes(minilm, hub.url, None) == expected
        assert hub.requests[("GET", "tree")] == 2

        assert sizes.selected_bytes(unknown, hub.url, None) is None          # the hub answers 404
        assert sizes.selected_bytes(unknown, hub.url, None) is None
        assert asked.count((hub.url, "nobody/nothing")) == 1
        before = hub.requests[("GET", "tree")]
        assert sizes.selected_bytes(minilm, hub.url, "a-token") == expected  # another token may see more
        assert hub.requests[("GET", "tree")] == before + 1
    finally:
        hub.stop()

    closed = f"http://127.0.0.1:{free_port()}"
    assert sizes.selected_bytes(minilm, closed, None) is None
    assert sizes.selected_bytes(unknown, closed, None) is None               # the whole endpoint is left alone
    assert [endpoint for endpoint, _ in asked].count(closed) == 1
    now[0] += UNREACHABLE_SECONDS + 1
    assert sizes.selected_bytes(unknown, closed, None) is None
    assert [endpoint for endpoint, _ in asked].count(closed) == 2
