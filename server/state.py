"""What the server is configured with (`ServerSettings`) and what its handlers share once it runs
(`ServerState`), apart from the app that builds them so the route modules can name them without
importing the app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters.store import AdapterStore
from backbone.tokenizer import Tokenizer
from router.path_guard import PathGuard
from router.request_router import RequestRouter
from router.task_table import TaskRoute, TaskTable
from server.auth import ApiKeys
from server.drain import DrainState
from server.engine import Engine, EngineConfig
from server.experiment_runtime import Experiments
from server.fair_queue import TenantLimits
from server.metrics import ServerMetrics
from server.store_sync import StoreSync


@dataclass
class ServerSettings:
    model: str = "default"  # "default" or a Hugging Face model folder
    served_model_name: str | None = None  # the base's name in `model` and `X-Adapter`; default from the model
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder, registered at startup
    tasks: dict[str, TaskRoute] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)  # name -> PUT /v1/experiments body
    state_dir: str | None = None  # experiments persist here (SQLite); None = in memory only
    api_keys: ApiKeys | None = None  # None = no authentication (bind to loopback)
    adapter_roots: list[str] = field(default_factory=list)  # where HTTP clients may load adapters from
    engine: EngineConfig = field(default_factory=EngineConfig)
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_body_bytes: int = 4 * 1024 * 1024  # prompts of a 128k context fit in well under 4 MiB
    metrics_public: bool = False  # /metrics without a key even with api_keys (scrapers on a private network)
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)  # with api_keys: per-tenant defaults; None = fair share
    limit_concurrency: int | None = None  # open connections / requests before 503; None = max_running + max_queued + 64
    header_timeout: float = 10.0  # seconds for a request's headers to arrive whole, else the connection closes
    body_timeout: float = 30.0  # seconds from a request's headers to its body's last byte, else 408 and close
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_choices: int = 16  # n x prompts per request at most: each choice is its own row in the batch
    raw_special_tokens: bool = False  # special-token text in chat content becomes control tokens (unsafe)
    host: str = "127.0.0.1"
    port: int = 8000
    pinned: list[str] = field(default_factory=list)  # adapters kept resident; /ready waits for them
    adapter_store: str | None = None  # a shared versioned store; `store:NAME@VERSION` paths read from it
    sync_store: bool = False  # serve every adapter of the store and follow its LATEST pointers
    store_poll_seconds: float = 2.0
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    dashboard: bool = True  # GET /dashboard and the JSON it polls
    runs_dir: str | None = None  # training runs (folders with log.jsonl) the dashboard lists
    device: str = "cpu"  # `loraplex serve` resolves auto (backbone/precision.py) before it gets here
    dtype: str = "float32"


@dataclass
class ServerState:
    """Everything the handlers use; built once in the lifespan and kept on `app.state.server`."""

    settings: ServerSettings
    engine: Engine
    tokenizer: Tokenizer
    base_name: str
    max_context: int
    tasks: TaskTable
    router: RequestRouter
    guard: PathGuard
    metrics: ServerMetrics
    drain: DrainState
    experiments: Experiments
    store: AdapterStore | None = None
    store_sync: StoreSync | None = None
    started: float = field(default_factory=time.time)
