"""Why a pull failed, as a reason the operator maps to a condition, and an exit code that says whether retrying
can help (transient) or not until something changes (permanent)."""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    # permanent: the spec, the token or the hub's content must change first
    INVALID_ARGUMENTS = "InvalidArguments"   # a bad id, revision, pattern or option: refused before any request
    NOT_FOUND = "NotFound"
    UNAUTHORIZED = "Unauthorized"
    UNSAFE_PATH = "UnsafePath"
    NO_FILES = "NoFilesSelected"
    INVALID_COMMIT = "InvalidCommit"         # the hub resolved the revision to something that is not a 40-hex commit
    PROXY_REFUSED = "ProxyRefused"           # the forward proxy (HTTP(S)_PROXY) refused or failed the request
    INTERNAL = "InternalError"
    NO_SPACE = "NoSpace"
    INTEGRITY = "IntegrityError"
    # transient: the network or the hub may get better
    NETWORK = "NetworkError"
    RATE_LIMITED = "RateLimited"
    STALLED = "Stalled"
    DEADLINE = "DeadlineExceeded"
    COMMIT_MISMATCH = "CommitMismatch"       # the endpoints resolve the revision to different commits (a lagging
                                             # mirror): the pod stops; a later pod may find them agreeing


PERMANENT = {Reason.INVALID_ARGUMENTS, Reason.NOT_FOUND, Reason.UNAUTHORIZED, Reason.UNSAFE_PATH, Reason.NO_FILES,
             Reason.INVALID_COMMIT, Reason.PROXY_REFUSED, Reason.INTERNAL}

# Exit codes of `modeldeploy pull` (0 is success, 1 a bug). Invalid arguments exit 3 with their `failed` line, like
# any permanent failure, so the operator reads a reason; 2 is left to the top-level `modeldeploy` parser (no
# subcommand), which never reaches the puller.
EXIT_INTERNAL = 1
EXIT_PERMANENT = 3
EXIT_TRANSIENT = 4
EXIT_NO_SPACE = 5
EXIT_INTEGRITY = 6
EXITS_FOR_GOOD = (EXIT_PERMANENT, EXIT_NO_SPACE)     # another try would end the same: the Job stops


def exit_code(reason: Reason) -> int:
    if reason is Reason.NO_SPACE:
        return EXIT_NO_SPACE
    if reason is Reason.INTEGRITY:
        return EXIT_INTEGRITY
    if reason is Reason.INTERNAL:
        return EXIT_INTERNAL
    return EXIT_PERMANENT if reason in PERMANENT else EXIT_TRANSIENT


class PullError(Exception):
    def __init__(self, reason: Reason, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.reason not in PERMANENT and self.reason is not Reason.NO_SPACE


def classify(error: BaseException, what: str) -> PullError:
    """Turns an exception from huggingface_hub or the network into a PullError naming `what` failed."""
    if isinstance(error, PullError):
        return error
    from huggingface_hub import errors as hf

    if isinstance(error, hf.LocalEntryNotFoundError) and error.__cause__ is not None:
        return classify(error.__cause__, what)   # the HEAD failed; its error says why
    if isinstance(error, hf.GatedRepoError):
        return PullError(Reason.UNAUTHORIZED, f"{what}: the repository is gated; its token has no access")
    if isinstance(error, hf.RevisionNotFoundError):
        return PullError(Reason.NOT_FOUND, f"{what}: revision not found")
    if isinstance(error, hf.RemoteEntryNotFoundError):
        return PullError(Reason.NOT_FOUND, f"{what}: file not found on the hub")
    if isinstance(error, hf.RepositoryNotFoundError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return PullError(Reason.UNAUTHORIZED,
                             f"{what}: 401 from the hub - the repository does not exist, or is private or gated "
                             "and needs a token with access")
        return PullError(Reason.NOT_FOUND, f"{what}: repository not found")
    if isinstance(error, hf.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        proxy = proxy_for(str(error.response.request.url)) if error.response.request is not None else None
        hub_headers = {"x-error-code", "x-repo-commit", "x-request-id", "x-error-message"}
        if proxy and status in (403, 407) and not hub_headers & {h.lower() for h in error.response.headers}:
            return PullError(Reason.PROXY_REFUSED, f"{what}: the proxy at {proxy} refused the request (HTTP "
                                                   f"{status}); check HTTPS_PROXY/HTTP_PROXY/NO_PROXY")
        if status in (401, 403):
            return PullError(Reason.UNAUTHORIZED, f"{what}: {status} from the hub - the token has no access")
        if status == 429:
            retry_after = error.response.headers.get("Retry-After")
            return PullError(Reason.RATE_LIMITED, f"{what}: rate limited by the hub (429)",
                             retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None)
        return PullError(Reason.NETWORK, f"{what}: HTTP {status} from the hub")
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28:
        return PullError(Reason.NO_SPACE, f"{what}: no space left in the cache")
    if isinstance(error, OSError) and "Consistency check failed" in str(error):
        return PullError(Reason.INTEGRITY, f"{what}: received size differs from the announced size")
    name = type(error).__name__
    if name == "ProxyError":       # httpx: the proxy refused a CONNECT or could not be reached
        return PullError(Reason.PROXY_REFUSED, f"{what}: the proxy failed the request: {str(error).splitlines()[0]}")
    detail = f"{what}: {name}: {str(error).splitlines()[0] if str(error) else name}"
    if isinstance(error, (hf.HTTPError, OSError, TimeoutError)):  # hf.HTTPError: its HTTP client's base error
        return PullError(Reason.NETWORK, detail)
    return PullError(Reason.INTERNAL, detail)


def proxy_for(url: str) -> str | None:
    """The proxy (host:port, no credentials) the environment routes `url` through, or None."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass_environment(parts.hostname):
        return None
    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if not proxy:
        return None
    where = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return f"{where.hostname}:{where.port}" if where.port else where.hostname
