"""GitOps health: the Argo CD health check shipped in examples/gitops (Lua, run here by a real Lua interpreter)
reads the statuses the operator really writes (made by the same status code) as Healthy, Progressing or Degraded."""

from __future__ import annotations

import lupa
import yaml

from modeldeploy.reconcile.status import Observation, status_patch
from tests.helpers import REPO

CHECK = yaml.safe_load((REPO / "examples" / "gitops" / "argocd-health-check.yaml").read_text())["data"][
    "resource.customizations.health.modeldeploy.io_ModelDeployment"]


def health(generation: int, status: dict | None) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    to_lua = lambda value: (lua.table_from({k: to_lua(v) for k, v in value.items()}) if isinstance(value, dict)  # noqa: E731
                            else lua.table_from([to_lua(v) for v in value]) if isinstance(value, list) else value)
    run = lua.eval(f"function(obj) {CHECK} end")
    obj = {"metadata": {"generation": generation}}
    if status is not None:
        obj["status"] = status
    result = run(to_lua(obj))
    return result["status"], result["message"]


def observed(generation: int, **steps) -> dict:
    return status_patch(Observation(generation=generation, **steps), [])[0]


def test_argo_cd_reads_the_operators_status():
    assert health(1, None)[0] == "Progressing"
    ready = observed(1, cache=(True, "Bound", "ok"), weights=(True, "Pulled", "ok"),
                     available=(True, "ReplicasReady", "2/2"))
    assert health(1, ready) == ("Healthy", "all replicas are ready")
    assert health(2, ready)[0] == "Progressing"            # a newer spec the operator has not seen yet
    pulling = observed(1, cache=(True, "Bound", "ok"), weights=(False, "Pulling", "42%"))
    assert health(1, pulling) == ("Progressing", "Pulling: 42%")
    failed = observed(1, cache=(True, "Bound", "ok"), weights=(False, "NotFound", "no such model"),
                      stalled=("NotFound", "no such model"))
    assert health(1, failed) == ("Degraded", "NotFound: no such model")
