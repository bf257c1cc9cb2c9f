"""Where weights come from. Sources differ by endpoint and by the token they accept, not by code path: each speaks
the Hugging Face Hub's HTTP API. A token is read only from its own source's variable, so a Gitee token is never sent
to huggingface.co, nor the reverse."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    endpoint: str
    token_env: str


SOURCES = {
    "huggingface": Source("huggingface", "https://huggingface.co", "HF_TOKEN"),
    # Gitee AI's HF-compatible API; its token is a Gitee personal access token, sent as a Bearer token too.
    "gitee": Source("gitee", "https://hf-api.gitee.com", "GITEE_TOKEN"),
}
