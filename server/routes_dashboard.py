"""The operator's dashboard: `GET /dashboard` (a static page shipped in the package) and the
JSON it polls (`/dashboard/api/state`, with each experiment's figures for admins, and
`/dashboard/api/runs`).

The page itself holds no data and is served to anyone; the JSON needs the same API keys as the
rest of the API. A browser cannot attach a header to a page load, so the page asks for the key,
keeps it in the tab's sessionStorage and sends it as `Authorization: Bearer` on its own fetches:
keys never travel in URLs, so they never land in access logs or browser history. A strict
Content-Security-Policy (scripts from this origin only, no inline script) backs up the page's
rule of rendering every name as text."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.deps import AdminDep, GrantDep, StateDep
from server.dashboard_view import dashboard_state, experiment_summaries
from server.engine import EngineStats
from server.http_errors import ApiError
from server.metrics import ServerMetrics
from server.traffic_history import TrafficHistory
from server.training_runs import list_runs

log = logging.getLogger("loraplex.server")

# Everything the page loads; nothing else under the package is ever served.
ASSETS = {
    "app.js": "text/javascript",
    "widgets.js": "text/javascript",
    "experiments.js": "text/javascript",
    "styles.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


def install_dashboard(app: FastAPI, metrics: ServerMetrics, interval_s: float = 5.0) -> None:
    """Add the dashboard's routes and sample traffic every `interval_s` while the app runs."""
    def engine_stats() -> EngineStats | None:
        state = getattr(app.state, "server", None)  # set once the lifespan has built the engine
        return state.engine.stats() if state is not None else None

    history = TrafficHistory(metrics, engine_stats, interval_s=interval_s)
    app.state.traffic_history = history
    app.include_router(router)
    serve_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_with_sampler(app: FastAPI) -> AsyncIterator[Any]:
        async with serve_lifespan(app) as lifespan_state:
            sampler = asyncio.create_task(_sample_forever(history))
            try:
                yield lifespan_state
            finally:
                sampler.cancel()

    app.router.lifespan_context = lifespan_with_sampler


async def _sample_forever(history: TrafficHistory) -> None:
    while True:
        try:
            history.sample()
        except Exception:  # a failed sample leaves a gap in the charts, never a dead sampler
            log.exception("dashboard traffic sample failed")
        await asyncio.sleep(history.interval_s)


def _asset(name: str) -> bytes:
    return resources.files("server").joinpath("dashboard", name).read_bytes()


@router.get("/dashboard")
async def dashboard_page() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/dashboard/static/{name}")
async def dashboard_asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"the dashboard has no file {name!r}", type="not_found_error", code="not_found")
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/dashboard/api/config")
async def dashboard_api_config(state: StateDep) -> JSONResponse:
    """Whether the page must ask for a key before its first fetch (so it never provokes a 401)."""
    return JSONResponse({"api_keys": state.settings.api_keys is not None}, headers={"Cache-Control": "no-store"})


@router.get("/dashboard/api/state")
async def dashboard_api_state(request: Request, state: StateDep, grant: GrantDep) -> JSONResponse:
    body = dashboard_state(state, grant, request.app.state.traffic_history)
    body["experiments"] = await run_in_threadpool(experiment_summaries, state, grant)  # SQLite reads: off the loop
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/dashboard/api/runs")
async def dashboard_api_runs(state: StateDep, admin: AdminDep) -> JSONResponse:
    """Training runs are not tied to tenants, so only admins see them."""
    runs_dir = state.settings.runs_dir
    runs = await run_in_threadpool(list_runs, Path(runs_dir)) if runs_dir else []
    return JSONResponse({"runs_dir": runs_dir, "runs": runs}, headers={"Cache-Control": "no-store"})
