"""Liveness (`/health`), readiness (`/ready`) and Prometheus metrics (`/metrics`). The first two
need no API key (orchestrators call them); `/metrics` needs one when keys are configured, unless
the server runs with --metrics-public (server.edge_auth)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST


router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "server", None)
    if state is None or not state.engine.alive:
        return JSONResponse({"status": "not ready", "reason": "the engine's worker is not running"}, status_code=503)
    if state.drain.draining:
        return JSONResponse({"status": "draining", "reason": "shutting down; running requests finish"}, status_code=503)
    waiting = state.engine.pinned_not_resident()
    if waiting:
        reason = f"pinned adapter(s) not yet resident: {', '.join(waiting)}"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready", "model": state.base_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
