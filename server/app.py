"""The FastAPI app: `create_app(settings)` builds the engine in the lifespan, so tests build an
app around a tiny model and `loraplex serve` around the real one.

Middleware is plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched:
one layer gives each request an id (echoing `X-Request-Id`) and writes the access log line,
one refuses keyless callers before their body is read (server.edge_auth), one bounds the body in
size and time before any handler parses JSON (server.edge_body)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.store import AdapterStore
from backbone.model_source import load_pretrained, served_model_name
from backbone.precision import resolve_precision
from router.path_guard import PathGuard
from router.request_router import RequestRouter
from router.task_table import TaskTable
from server.compute_threads import serial_torch
from server.drain import DrainMiddleware, DrainState
from server.edge_auth import EdgeAuthMiddleware
from server.edge_body import BodyLimitMiddleware, header_value
from server.engine import Engine, EngineConfig
from server.experiment_runtime import build_experiments
from server.fair_queue import limit_table
from server.http_errors import install_error_handlers, to_response
from server.metrics import UNROUTED, ServerMetrics
from server.openapi_doc import install_openapi
from server.routes_adapters import router as adapters_router
from server.routes_dashboard import install_dashboard
from server.routes_completions import router as completions_router
from server.routes_experiments import router as experiments_router
from server.routes_health import router as health_router
from server.routes_tasks import router as tasks_router
from server.state import ServerSettings, ServerState
from server.store_sync import StoreSync

access_log = logging.getLogger("loraplex.access")
log = logging.getLogger("loraplex.server")

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # echoed into headers and logs: keep it tame


def create_app(settings: ServerSettings, drain: DrainState | None = None) -> FastAPI:
    """`drain` is shared with the process's signal handling (server/drain.py); tests may pass their own."""
    holder: dict[str, Engine] = {}
    metrics = ServerMetrics(stats_source=lambda: holder["engine"].stats() if "engine" in holder else None)
    drain = drain or DrainState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings, metrics, drain)
        holder["engine"] = state.engine
        app.state.server = state
        log.info(
            "serving %s (context %d) with %d adapter(s), %d task(s)",
            state.base_name, state.max_context, len(state.engine.adapter_infos()), len(state.tasks.snapshot()),
        )
        if state.store_sync is not None:
            state.store_sync.start()
        try:
            yield
        finally:
            if state.store_sync is not None:
                state.store_sync.stop()
            holder.pop("engine", None)
            state.engine.shutdown()
            await state.experiments.drain()  # every handle has finished now: record the last outcomes
            state.experiments.store.close()

    app = FastAPI(title="loraplex", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    install_error_handlers(app)
    install_openapi(app)
    for router in (completions_router, adapters_router, tasks_router, health_router, experiments_router):
        app.include_router(router)
    if settings.dashboard:
        install_dashboard(app, metrics)
    # Added last = outermost: the request id exists before the body limit can refuse a request.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(EdgeAuthMiddleware, keys=settings.api_keys, metrics_public=settings.metrics_public)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def build_state(settings: ServerSettings, metrics: ServerMetrics, drain: DrainState) -> ServerState:
    """Load the model, start the engine, register the configured adapters and tasks. Any bad
    adapter or task here stops startup: a server should not come up half-configured."""
    with serial_torch():  # the engine's worker is the one thread for parallel math
        precision = resolve_precision(settings.device, settings.dtype)
        model, tokenizer = load_pretrained(settings.model, dtype=precision.dtype, device=precision.device)
        base_name = settings.served_model_name or served_model_name(settings.model)
        engine = Engine(model, tokenizer, engine_config(settings), base_name)
    engine.start()
    store = AdapterStore(settings.adapter_store) if settings.adapter_store else None
    sync = None
    try:
        for name, path in settings.adapters.items():
            info = engine.register_adapter(name, Path(path))
            for warning in info.warnings:
                log.warning("adapter %s: %s", info.key, warning)
        if store is not None and settings.sync_store:
            # The first pass runs before the server answers, so a replica is ready only once it
            # serves what the store holds; a broken version is logged and skipped, not fatal.
            sync = StoreSync(store, engine.register_adapter, engine.unregister_adapter, settings.store_poll_seconds)
            report = sync.sync_once()
            log.info("adapter store %s: serving %d adapter(s), %d refused", store.root, len(report.registered), len(report.failed))
        for name in settings.pinned:
            engine.pin_adapter(name)
        tasks = TaskTable()
        registered = {info.name for info in engine.adapter_infos()}
        for task, route in settings.tasks.items():
            missing = [adapter for adapter in route.adapters if adapter not in registered]
            if missing:
                raise ValueError(
                    f"task {task!r} routes to adapter(s) {missing} that are not registered; "
                    "add them with --adapter NAME=PATH (or under `adapters:` in the config file)"
                )
            tasks.put(task, route)

        def adapter_names() -> set[str]:  # read per request: adapters load and unload at run time
            return {info.name for info in engine.adapter_infos()}

        experiments = build_experiments(settings.state_dir, settings.experiments, adapter_names, metrics.registry, engine)
    except BaseException:
        engine.shutdown()
        raise
    router = RequestRouter(tasks, adapter_names, base_name, experiments)
    return ServerState(
        settings=settings,
        engine=engine,
        tokenizer=tokenizer,
        base_name=base_name,
        max_context=engine.max_context,
        tasks=tasks,
        router=router,
        guard=PathGuard(settings.adapter_roots),
        metrics=metrics,
        drain=drain,
        store=store,
        store_sync=sync,
        experiments=experiments,
    )


def engine_config(settings: ServerSettings) -> EngineConfig:
    """The engine's settings; with API keys, each tenant is held to its limits (server.fair_queue)."""
    if settings.api_keys is None:
        return settings.engine
    engine = settings.engine
    table = limit_table(settings.api_keys.tenant_limits(), engine.max_running, engine.max_queued, settings.tenant_limits)
    return replace(engine, tenant_limits=table)


class RequestContextMiddleware:
    """Request id (echo `X-Request-Id` or make one), access log line, error counter."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = header_value(scope, b"x-request-id")
        request_id = supplied if supplied and REQUEST_ID_PATTERN.match(supplied) else uuid4().hex
        started = time.monotonic()
        scope.setdefault("state", {}).update(request_id=request_id, arrival=started)
        status = 500
        status_sent = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, status_sent
            if message["type"] == "http.response.start":
                status, status_sent = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as err:  # a bug in one request must not take the connection or server down
            if status_sent:
                log.exception("request %s failed after its response started", request_id)
            else:
                await to_response(err, request_id)(scope, receive, send_with_id)
        finally:
            if status >= 400:
                adapter = scope["state"].get("adapter_label", UNROUTED)
                self.metrics.errors.labels(adapter, str(status)).inc()
            access_log.info(
                "%s %s %s %d %.1fms adapter=%s",
                request_id, scope["method"], scope["path"], status, (time.monotonic() - started) * 1000,
                scope["state"].get("adapter_label", UNROUTED),
            )
