"""Which hub endpoints a pull may use: the one place that decides it, for the operator, its pull Jobs and `render`.

The cluster admin decides, in the operator's configuration: each source's own hub, the default mirrors configured
for it, and the endpoints listed as allowed. A namespace user can name only those, so neither the operator nor a
pull pod is ever pointed at cloud metadata, an in-cluster service or a host of the user's choosing; and a token is
sent over plain http:// only to an endpoint the admin marked for it."""

from __future__ import annotations

from urllib.parse import urlsplit

from modeldeploy.config import ANY_ENDPOINT, OperatorConfig
from modeldeploy.pull.sources import SOURCES

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize(url: str) -> str:
    """`scheme://host[:port][/path]`, lower-case, the default port and a trailing slash dropped: the form in which
    endpoints are compared. ValueError, saying why, for a URL that cannot be a hub endpoint."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("it contains whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in DEFAULT_PORTS:
        raise ValueError("it must start with https:// or http://")
    if "@" in parts.netloc:
        raise ValueError("it must not carry credentials (user:password@); a token goes in tokenSecretRef")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise ValueError("it must not have a query or a fragment")
    if not parts.hostname:
        raise ValueError("it has no host")
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    port = parts.port          # ValueError for a port that is not a number in range
    host = f"[{host}]" if ":" in host else host
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def defaults(source: str, config: OperatorConfig) -> list[str]:
    """The endpoints a pull of `source` uses when the resource names none: the admin's, else the source's own hub."""
    return [normalize(url) for url in config.pull.endpoints.get(source) or [SOURCES[source].endpoint]]


def allowed(source: str, config: OperatorConfig) -> list[str] | None:
    """The endpoints a resource may name for `source`; None when the admin allows any."""
    extra = config.pull.allowed_endpoints.get(source, [])
    if ANY_ENDPOINT in extra:
        return None
    return list(dict.fromkeys([normalize(SOURCES[source].endpoint), *defaults(source, config),
                               *(normalize(url) for url in extra)]))


def pull_endpoints(spec, config: OperatorConfig) -> list[str]:
    """Where the pull goes, in order (a valid spec: see `problems`)."""
    return [normalize(spec.model.endpoint)] if spec.model.endpoint else defaults(spec.model.source, config)


def problems(spec, config: OperatorConfig) -> list[str]:
    """Why this spec's endpoints may not be used under this configuration (empty: they may)."""
    model = spec.model
    if model.endpoint:
        try:
            endpoint = normalize(model.endpoint)
        except ValueError as error:
            return [f"spec.model.endpoint {model.endpoint!r} is not a usable hub URL: {error}"]
        permitted = allowed(model.source, config)
        if permitted is not None and endpoint not in permitted:
            return [f"spec.model.endpoint {endpoint} is not allowed for source {model.source}; the operator allows "
                    f"{', '.join(permitted)} (the cluster admin lists more in the operator's pull.allowedEndpoints)"]
    if model.token_secret_ref is not None:
        clear = {normalize(url) for url in config.pull.token_over_http}
        for endpoint in pull_endpoints(spec, config):
            if endpoint.startswith("http://") and endpoint not in clear:
                return [f"spec.model.tokenSecretRef: the token would travel unencrypted to {endpoint}; use an "
                        "https:// endpoint (or the cluster admin lists this one in pull.tokenOverHttp)"]
    return []
