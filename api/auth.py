"""Who may call what: API keys and their scopes, limits per key, CORS, and the security headers of every response.

Everything runs in one `before_request` (refuse early) and one `after_request` (headers), attached by `init_app`.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Any

from flask import Flask, Response, g, request

from shared.auth import ADMIN, ANONYMOUS, JOBS, PREDICT, KeyRing, Principal, load_keys
from shared.errors import AuthNotConfigured, Forbidden, RateLimited, Unauthorized
from shared.ratelimit import RateLimiter
from shared.redisio import connect
from shared.settings import Settings

log = logging.getLogger(__name__)

#: The contract's health routes (those not served here yet included), the OpenAPI document, and the web page with
#: its script and style (the page holds no data; it asks for a key and fetches everything with it): no key needed.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/ping", "/health", "/version", "/v2/health/live",
                        "/v2/health/ready", "/openapi.json", "/", "/static/<path:filename>"})

#: The scope each route needs, by path prefix (Flask rule or OpenAPI path). A route under none of them needs
#: admin, so a route added without a line here is never open by accident.
ROUTE_SCOPES = (("/v1/models", PREDICT), ("/invocations", PREDICT), ("/v2/models", PREDICT), ("/v2", PREDICT),
                ("/v1/jobs", JOBS), ("/v1/schedules", ADMIN), ("/metrics", ADMIN))

#: An unknown route (404) or method (405) needs a valid key, whatever its scopes.
ANY_KEY = "any"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    # Every answer is data (JSON, CSV, Parquet, text), never a page: nothing in it may load, run or be framed.
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
_CORS_EXPOSED = "Location, Retry-After, WWW-Authenticate, Content-Disposition"


def required_scope(path: str) -> str | None:
    """The scope a route needs (None: open to all)."""
    if path in OPEN_PATHS:
        return None
    for prefix, scope in ROUTE_SCOPES:
        if path == prefix or path.startswith(prefix + "/"):
            return scope
    return ADMIN


def current_principal() -> Principal:
    """Who the current request acts for (set by the check before every non-open route)."""
    return g.principal


def bearer_key(header: str | None) -> str | None:
    scheme, _, key = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


@functools.lru_cache(maxsize=1024)  # asked on every request, of a few addresses
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def arrived_on_loopback(environ: dict[str, Any]) -> bool:
    """Whether the request came in on a loopback address (or a unix socket) of this machine.

    The connection's own local address where the server exposes its socket (gunicorn, werkzeug); otherwise the
    server's name for itself, which for a server bound to 0.0.0.0 or a public name is not loopback.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is not None:
        try:
            local = sock.getsockname()
        except OSError:
            return False
        return isinstance(local, (str, bytes)) or _is_loopback(str(local[0]))
    return _is_loopback(str(environ.get("SERVER_NAME", "")))


class Gate:
    """The checks every request passes: CORS preflight, key, rate limit, scope; then the response headers."""

    def __init__(self, settings: Settings, ring: KeyRing | None, limiter: RateLimiter | None):
        self.auth_off = settings.AUTH == "off"
        self.ring = ring
        self.limiter = limiter
        self.cors = frozenset(settings.cors_origins)

    def describe(self) -> str:
        if self.auth_off:
            return "auth: AUTH=off; every request is served without an API key"
        if self.ring is not None:
            limit = f"{self.limiter.limit} requests a minute per key" if self.limiter else "no rate limit"
            return f"auth: API keys required ({len(self.ring)} configured; {limit})"
        return "auth: no API keys configured; only requests that reach a loopback address are served"

    def allowed_origin(self, origin: str | None) -> str | None:
        """What Access-Control-Allow-Origin answers to a request's Origin header (None: no CORS header)."""
        if not origin or not self.cors:
            return None
        if "*" in self.cors:
            return "*"
        return origin if origin.rstrip("/") in self.cors else None

    def check(self) -> Response | None:
        """Flask's `before_request`: a CORS preflight's answer, or the request's principal in `g` (or a refusal)."""
        if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                and self.allowed_origin(request.headers.get("Origin"))):
            # A browser's preflight carries no credentials; the real request that follows does.
            return Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, Idempotency-Key",
                "Access-Control-Max-Age": "600"})
        rule = request.url_rule
        found = self.identify(request.environ, request.method, request.path, rule.rule if rule is not None else None)
        if found is not None:
            g.principal = found[0]
            self.admit(*found, request.method, rule.rule if rule is not None else request.path)
        return None

    def identify(self, environ: dict[str, Any], method: str, path: str,
                 rule: str | None) -> tuple[Principal, str] | None:
        """Who a request acts for and the scope its route (`rule`; None: no route matched) needs; None: open route.

        Counts nothing. Raises the refusals that come first: a service without keys reached off loopback (403),
        no key or an unknown one (401).
        """
        scope = required_scope(rule) if rule is not None else (None if path in OPEN_PATHS else ANY_KEY)
        if scope is None:
            return None
        if self.ring is None:
            if not self.auth_off and not arrived_on_loopback(environ):
                raise AuthNotConfigured(
                    "This service has no API keys and serves only requests to a loopback address; its operator "
                    "must set API_KEYS_FILE (or AUTH=off behind an authenticating proxy).")
            return ANONYMOUS, scope
        presented = bearer_key(environ.get("HTTP_AUTHORIZATION"))
        if presented is None:
            raise Unauthorized("This route needs an API key: send the header 'Authorization: Bearer <key>'.",
                               headers={"WWW-Authenticate": 'Bearer realm="predq"'})
        key = self.ring.find(presented)
        if key is None:
            log.info("request refused: unknown API key", extra={"method": method, "path": path,
                                                                 "client": environ.get("REMOTE_ADDR")})
            raise Unauthorized("The API key is not valid.",
                               headers={"WWW-Authenticate": 'Bearer realm="predq", error="invalid_token"'})
        return Principal(key.name, key.scopes), scope

    def admit(self, principal: Principal, scope: str, method: str, route: str) -> None:
        """Count a key's request against its limit (429 past it), then check the scope `route` needs (403)."""
        if principal.name is None:  # no keys: nothing to count or check
            return
        if self.limiter is not None:
            decision = self.limiter.hit(principal.name)
            if not decision.allowed:
                raise RateLimited(f"This API key made more than {self.limiter.limit} requests in the last minute; "
                                  f"retry in {decision.retry_after} s.",
                                  headers={"Retry-After": str(decision.retry_after)})
        if scope != ANY_KEY and not principal.allows(scope):
            raise Forbidden(f"The API key {principal.name!r} does not have the '{scope}' scope, which "
                            f"{method} {route} needs.", details={"required_scope": scope})

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """The headers every answer gets, given the request's Origin: security headers, then CORS's."""
        headers = list(SECURITY_HEADERS.items())
        if self.cors:
            headers.append(("Vary", "Origin"))
            allowed = self.allowed_origin(origin)
            if allowed is not None:
                headers += [("Access-Control-Allow-Origin", allowed), ("Access-Control-Expose-Headers", _CORS_EXPOSED)]
        return headers

    def decorate(self, response: Response) -> Response:
        """Flask's `after_request`: add `response_headers`, keeping security headers a route set itself."""
        for name, value in self.response_headers(request.headers.get("Origin")):
            if name == "Vary":
                response.vary.add(value)
            elif name in SECURITY_HEADERS:
                response.headers.setdefault(name, value)
            else:
                response.headers[name] = value
        return response


def init_app(app: Flask, settings: Settings) -> None:
    """Read the keys (a bad file stops the process), build the limiter, attach the checks; log which case applies."""
    ring = load_keys(settings.API_KEYS_FILE) if settings.API_KEYS_FILE and settings.AUTH == "on" else None
    limiter = None
    if ring is not None and settings.RATE_LIMIT_PER_MINUTE > 0:
        # Its own short timeouts: a slow Redis must not hold up predictions, which otherwise never touch it.
        client = connect(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        limiter = RateLimiter(client, settings.RATE_LIMIT_PER_MINUTE)
    gate = Gate(settings, ring, limiter)
    app.extensions["predq.auth"] = gate
    app.before_request(gate.check)
    app.after_request(gate.decorate)
    log.info(gate.describe())
