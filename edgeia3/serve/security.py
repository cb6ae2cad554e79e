"""Who may talk to the server, and which files it may read.

- ``check_bind``: a non-loopback ``--host`` needs ``--api-key`` (or ``--insecure``).
- ``Guard``: an ASGI middleware in front of every route: the ``Host`` header must name
  this server (loopback names, the bound host; any port), which stops DNS rebinding;
  with an API key, every path but ``/health`` needs it (``/docs``, ``/openapi.json``
  and ``/metrics`` included).
- ``require_json``: POST bodies must say ``Content-Type: application/json`` (415
  otherwise), so a cross-site HTML form (``text/plain``, no CORS preflight) is refused
  before its body is read.
- ``confine``: run-time adapter loading by path is off without ``--adapters-dir``; with
  it, only files inside it (symlinks and ``..`` resolved). The error for a path outside
  never depends on whether that path exists.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from pathlib import Path
from typing import Any, Callable

from ..errors import EdgeIA3Error
from .requests import ServeError

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"", "0.0.0.0", "::"})
OPEN_PATHS = frozenset({"/health"})  # answered without the API key


def _ip(host: str) -> Any:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host.lower().rstrip(".") == "localhost" if ip is None else ip.is_loopback


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless the user insists."""
    if api_key or insecure or is_loopback(host):
        return
    raise EdgeIA3Error(f"refusing to listen on {host} without --api-key: anyone who can reach this port could "
                       "run the model and load adapters; set --api-key KEY (or EDGEIA3_API_KEY), bind 127.0.0.1, "
                       "or pass --insecure to serve without a key anyway")


def host_name(header: str) -> str:
    """The host part of a ``Host`` header (no port, no brackets), lower case."""
    h = header.strip().lower()
    if h.startswith("["):  # [::1]:8000
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


class HostCheck:
    """Which ``Host`` headers name this server: the loopback names and the bound host; a
    wildcard bind also takes any IP literal and this machine's host names (a DNS rebinding
    attack needs a name of the attacker's, never an IP literal)."""

    def __init__(self, bound: str):
        self.bound = host_name(bound) if bound not in WILDCARD else None
        self.names = set(LOOPBACK) | ({self.bound} if self.bound else set())
        if self.bound is None:
            self.names |= {n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n}

    def allows(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host: not a browser
            return True
        name = host_name(header)
        return name in self.names or (self.bound is None and _ip(name) is not None)


def key_matches(authorization: str, api_key: str) -> ServeError | None:
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return ServeError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", "invalid_api_key")
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        return ServeError(401, "incorrect API key provided", "invalid_api_key")
    return None


class Guard:
    """ASGI middleware: the Host check, then the API key (all paths but ``OPEN_PATHS``)."""

    def __init__(self, app: Any, hosts: HostCheck, api_key: str | None, reply: Callable[[ServeError], Any]):
        self.app, self.hosts, self.api_key, self.reply = app, hosts, api_key, reply

    def refusal(self, scope: dict) -> ServeError | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        if not self.hosts.allows(headers.get("host")):
            return ServeError(403, "this server does not answer to that Host header (use 127.0.0.1, localhost "
                                   "or the address it listens on)", "host_not_allowed")
        if self.api_key and scope.get("path") not in OPEN_PATHS:
            return key_matches(headers.get("authorization", ""), self.api_key)
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        err = self.refusal(scope) if scope["type"] == "http" else None
        if err is None:
            return await self.app(scope, receive, send)
        return await self.reply(err)(scope, receive, send)


def require_json(content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ServeError(415, f"Content-Type must be application/json (got {media or 'none'!r})",
                         "unsupported_media_type")


def confine(adapters_dir: Path | None, path: str) -> Path:
    """``path`` (relative: to ``adapters_dir``) resolved, if it lies inside ``adapters_dir``."""
    if adapters_dir is None:
        raise ServeError(403, "loading adapters by path is disabled: start the server with --adapters-dir DIR "
                              "to allow loading files inside DIR", "adapter_loading_disabled", "path")
    try:
        p = (adapters_dir / path).resolve()  # an absolute path replaces adapters_dir
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        p = None
    if p is None or adapters_dir not in p.parents:
        raise ServeError(403, "adapter paths must lie inside the server's --adapters-dir", "path_not_allowed",
                         "path")
    return p
