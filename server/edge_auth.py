"""With API keys configured, every request shows a valid key before its body is read.

Routes still check what the key may do (tenant, admin); this layer only keeps keyless callers
from costing anything: a body (up to the size limit) is never buffered for them, and the
endpoints that describe the server (`/metrics` lists every tenant's adapters and traffic,
`/openapi.json` the whole API) answer them 401 like the rest. `/health` and `/ready` stay open
for orchestrators; `/metrics` too where scrapers on a private network cannot send a key."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth import ApiKeys, AuthenticationError
from server.http_errors import to_response

ALWAYS_PUBLIC = frozenset({"/health", "/ready"})
# The dashboard's page, its static files and its login settings hold no data, and a browser
# cannot attach a key to a page load; the page sends the key with every data request it makes.
DASHBOARD_SHELL = frozenset({"/dashboard", "/dashboard/api/config"})
DASHBOARD_STATIC = "/dashboard/static/"


class EdgeAuthMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys | None, metrics_public: bool) -> None:
        self.app = app
        self.keys = keys
        self.public = ALWAYS_PUBLIC | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys is None or scope["type"] != "http" or scope["path"] in self.public or _dashboard_shell(scope):
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        try:
            self.keys.authenticate(authorization)
        except AuthenticationError as err:
            await to_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _dashboard_shell(scope: Scope) -> bool:
    path = scope["path"]
    return scope["method"] in ("GET", "HEAD") and (path in DASHBOARD_SHELL or path.startswith(DASHBOARD_STATIC))
