"""`loraplex serve`: settings from flags and an optional YAML config, then uvicorn.

Flags win over the config file; lists (adapters, tasks, roots) are merged, flags last. The
config file holds the same settings under the flags' names, plus inline `api_keys`:

    model: default
    adapters: {summarize-v1: /srv/adapters/summarize/v1}
    tasks: {summarize: summarize-v1, qa: {arms: {qa-a: 0.5, qa-b: 0.5}}}
    adapter_roots: [/srv/adapters]
    adapter_store: /shared/adapters   # with sync: true, serve every adapter of the store
    pinned: [summarize-v1]
    max_loras: 8
    device: auto                 # auto | cpu | cuda | cuda:N
    dtype: auto                  # auto | float32 | bfloat16 | float16
    api_keys: keys.yaml          # a file, or the mapping itself
    state_dir: /var/lib/loraplex # experiments persist here
    experiments: {qa-v2: {task: qa, control: a, arms: [{name: a, adapter: qa-a, weight: 1}, {name: b, adapter: qa-b, weight: 1}]}}
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from backbone.precision import add_precision_args, resolve_precision
from router.task_table import TaskRoute, check_name, parse_task_spec, route_from_json
from server.app import ServerSettings, create_app
from server.auth import ApiKeys
from server.drain import DrainingServer, DrainState
from server.edge_server import uvicorn_config
from server.engine import EngineConfig
from server.fair_queue import TenantLimits

log = logging.getLogger("loraplex.serve")

# Config-file keys that map onto EngineConfig fields of the same name.
ENGINE_KEYS = ("max_running", "max_queued", "max_context", "max_loras", "max_cpu_loras", "max_lora_rank", "prefill_chunk", "strict_base",
               "gpu_memory_fraction", "prefix_cache", "prefix_cache_mb", "prefix_block_tokens", "merge_single_adapter")  # fmt: skip
SERVER_KEYS = (
    "model", "served_model_name", "host", "port", "request_timeout", "max_body_bytes", "dashboard", "device", "dtype",
    "adapter_store", "sync_store", "store_poll_seconds", "drain_timeout",
)
# Multi-tenant safety settings (server.edge_auth, server.edge_body, server.edge_server, server.fair_queue).
SAFETY_KEYS = ("metrics_public", "limit_concurrency", "header_timeout", "body_timeout", "keep_alive_timeout",
               "raw_special_tokens", "max_choices")
TENANT_KEYS = ("tenant_max_running", "tenant_max_queued")
KNOWN_KEYS = {
    *ENGINE_KEYS, *SERVER_KEYS, *SAFETY_KEYS, *TENANT_KEYS,
    "adapters", "tasks", "adapter_roots", "api_keys", "pinned", "runs_dir", "state_dir", "experiments",
}


class ServeConfigError(ValueError):
    """The serve config file or a flag is malformed."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible API over one base model and many adapters",
        description="Serve the OpenAI-compatible API (chat and completions) with LoRA adapters routed by task.",
    )
    serve.add_argument("--model", help="`default` (SmolLM2-135M-Instruct) or a Hugging Face model folder")
    serve.add_argument("--served-model-name", help="the base model's name in the API (default: from the model)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="register an adapter at startup")
    serve.add_argument("--task", action="append", default=[], metavar="TASK=ADAPTER",
                       help="route a task to an adapter; TASK=A:0.9,B:0.1 splits it into A/B arms")
    serve.add_argument("--config", type=Path, help="YAML file with the same settings")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--max-loras", type=int, help="resident adapter slots (default 8)")
    serve.add_argument("--max-cpu-loras", type=int, help="parsed adapters kept in CPU memory (default 32)")
    serve.add_argument("--max-lora-rank", type=int, help="largest adapter rank served (default 64)")
    serve.add_argument("--max-running", type=int, help="requests decoding at once (default 16)")
    serve.add_argument("--max-queued", type=int, help="waiting requests before 429 (default 256)")
    serve.add_argument("--max-context", type=int, help="prompt + max_tokens limit (default: the model's)")
    serve.add_argument("--request-timeout", type=float, help="seconds from arrival to last token (default 600)")
    serve.add_argument("--api-keys", type=Path, help="YAML/JSON file: key -> {tenant, tasks, adapters, admin}")
    serve.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                       help="folder HTTP clients may load adapters from (repeatable); none = HTTP loading off")
    serve.add_argument("--strict-base", action="store_true", default=None,
                       help="refuse adapters that record another base model")
    serve.add_argument("--pin", action="append", default=[], metavar="NAME",
                       help="keep this adapter resident in a slot; /ready waits until it is (repeatable)")
    replicas = serve.add_argument_group("replicas (deploy/ has nginx and Kubernetes examples)")
    replicas.add_argument("--adapter-store", metavar="DIR",
                          help="a shared adapter store (`loraplex adapter publish`); load_lora_adapter then "
                          "accepts lora_path `store:NAME` or `store:NAME@VERSION`")
    replicas.add_argument("--sync", dest="sync_store", action="store_true", default=None,
                          help="serve every adapter of --adapter-store under its name and follow its LATEST "
                          "pointers, so a publish reaches every replica")
    replicas.add_argument("--store-poll-seconds", type=float, help="how often --sync reads the store (default 2)")
    replicas.add_argument("--drain-timeout", type=float,
                          help="after SIGTERM: seconds running requests get to finish while /ready says "
                          "draining and new requests get 503 (default 30)")
    serve.add_argument("--no-dashboard", dest="dashboard", action="store_false", default=None,
                       help="do not serve the web dashboard at /dashboard")
    serve.add_argument("--runs-dir", type=Path, help="folder of training runs (each with log.jsonl) the dashboard lists")
    add_precision_args(serve, config_keys=True)  # None here: the config's `device`/`dtype`, else auto
    serve.add_argument("--gpu-memory-fraction", type=float,
                       help="share of the GPU's memory the server may use; the KV cache and adapter slots are "
                            "sized at start and a configuration that does not fit fails then (default 0.9)")
    serve.add_argument("--state-dir", type=Path,
                       help="folder for state that survives restarts (experiments, in SQLite); default: none, kept in memory")
    safety = serve.add_argument_group("multi-tenant safety")
    safety.add_argument("--metrics-public", action="store_true", default=None,
                        help="serve /metrics without a key even with --api-keys (scrapers on a private network)")
    safety.add_argument("--tenant-max-running", type=int, help="rows one tenant may hold (default: all but a quarter)")
    safety.add_argument("--tenant-max-queued", type=int, help="requests one tenant may queue (default: half the queue)")
    safety.add_argument("--limit-concurrency", type=int, help="connections/requests before 503 (default: running + queued + 64)")
    safety.add_argument("--header-timeout", type=float, help="seconds for request headers to arrive (default 10)")
    safety.add_argument("--body-timeout", type=float,
                        help="seconds from a request's headers to its body's last byte, else 408 (default 30)")
    safety.add_argument("--keep-alive-timeout", type=float, help="seconds an idle connection stays open (default 5)")
    safety.add_argument("--max-choices", type=int,
                        help="most choices one request may ask for (n times its prompts); each is a running row (default 16)")
    safety.add_argument("--raw-special-tokens", action="store_true", default=None,
                        help="let special-token text in chat messages become control tokens (default: plain text)")
    serve.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                       help="do not reuse the KV of prompt prefixes between requests (on by default)")
    serve.add_argument("--prefix-cache-mb", type=float,
                       help="memory for prefix KV blocks moved out of cache rows that new requests reuse "
                       "(default 256; idle rows keep their blocks at no cost)")
    serve.add_argument("--no-merge-single-adapter", dest="merge_single_adapter", action="store_false", default=None,
                       help="never merge an adapter into a copy of the weights (by default, once a few batches in a row "
                       "are all on one adapter, it is merged so they run at the base model's speed; the copy costs the "
                       "memory of the adapted weights)")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.api_keys is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s without --api-keys: anyone who can reach it may load and unload adapters "
            "and edit tasks; pass --api-keys FILE", settings.host,
        )
    drain = DrainState()
    app = create_app(settings, drain)
    DrainingServer(uvicorn_config(app, settings, timeout_graceful_shutdown=settings.drain_timeout), drain).run()
    return 0


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    config = load_config(args.config) if args.config else {}
    base_dir = args.config.parent if args.config else Path.cwd()
    flags = {
        "model": args.model, "served_model_name": args.served_model_name, "host": args.host, "port": args.port,
        "request_timeout": args.request_timeout, "max_running": args.max_running, "max_queued": args.max_queued,
        "max_context": args.max_context, "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
        "max_lora_rank": args.max_lora_rank, "strict_base": args.strict_base, "dashboard": args.dashboard,
        "device": args.device, "dtype": args.dtype, "gpu_memory_fraction": args.gpu_memory_fraction,
        "adapter_store": args.adapter_store, "sync_store": args.sync_store,
        "store_poll_seconds": args.store_poll_seconds, "drain_timeout": args.drain_timeout,
        "prefix_cache": args.prefix_cache, "prefix_cache_mb": args.prefix_cache_mb,
        "merge_single_adapter": args.merge_single_adapter,
        **{key: getattr(args, key) for key in (*SAFETY_KEYS, *TENANT_KEYS)},
    }
    merged = {**config, **{key: value for key, value in flags.items() if value is not None}}
    # Resolved before the model loads, so a bad --device/--dtype is a one-line error at once.
    precision = resolve_precision(merged.get("device") or "auto", merged.get("dtype") or "auto")
    log.info("serving on %s in %s (%s)", precision.device, precision.dtype_name, precision.reason)
    merged["device"], merged["dtype"] = str(precision.device), precision.dtype_name

    adapters = {name: str(_relative_to(base_dir, path)) for name, path in _mapping(config, "adapters").items()}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ServeConfigError(f"--adapter {spec!r} must look like NAME=PATH")
        adapters[check_name(name, "adapter")] = path
    tasks: dict[str, TaskRoute] = {}
    for task, target in _mapping(config, "tasks").items():
        tasks[check_name(task, "task")] = route_from_json(target)
    for spec in args.task:
        task, route = parse_task_spec(spec)
        tasks[task] = route

    api_keys = None
    if args.api_keys is not None:
        api_keys = ApiKeys.from_file(args.api_keys)
    elif isinstance(config.get("api_keys"), str):
        api_keys = ApiKeys.from_file(_relative_to(base_dir, config["api_keys"]))
    elif config.get("api_keys") is not None:
        api_keys = ApiKeys.from_mapping(config["api_keys"], source=f"{args.config}: api_keys")

    runs_dir = args.runs_dir or (_relative_to(base_dir, config["runs_dir"]) if config.get("runs_dir") else None)
    if runs_dir is not None and not Path(runs_dir).is_dir():
        raise ServeConfigError(f"--runs-dir {runs_dir} is not a folder; point it at the folder holding your training runs")
    roots = [str(_relative_to(base_dir, root)) for root in config.get("adapter_roots") or []] + list(args.adapter_root)
    try:
        engine = EngineConfig(**{key: merged[key] for key in ENGINE_KEYS if key in merged})
    except TypeError as err:
        raise ServeConfigError(f"engine settings are malformed: {err}") from None
    for key, flag in (("prefix_cache", "--no-prefix-cache"), ("merge_single_adapter", "--no-merge-single-adapter")):
        if not isinstance(getattr(engine, key), bool):
            raise ServeConfigError(f"{key} ({flag}) must be true or false, got {getattr(engine, key)!r}")
    if not isinstance(engine.prefix_cache_mb, (int, float)) or engine.prefix_cache_mb < 0:
        raise ServeConfigError(f"prefix_cache_mb (--prefix-cache-mb) must be a number of MiB >= 0, got {engine.prefix_cache_mb!r}")
    server_fields = {key: merged[key] for key in (*SERVER_KEYS, *SAFETY_KEYS) if merged.get(key) is not None}
    for key in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        value = server_fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            flag = "--" + key.replace("_", "-")
            raise ServeConfigError(f"{key} ({flag}) must be a number of seconds > 0, got {value!r}")
    if "adapter_store" in server_fields:
        server_fields["adapter_store"] = str(_relative_to(base_dir, server_fields["adapter_store"]))
    if server_fields.get("sync_store") and "adapter_store" not in server_fields:
        raise ServeConfigError("--sync follows an adapter store: give it with --adapter-store DIR")
    pinned = list(config.get("pinned") or []) + list(args.pin)
    state_dir = args.state_dir or (_relative_to(base_dir, config["state_dir"]) if config.get("state_dir") else None)
    return ServerSettings(
        adapters=adapters, tasks=tasks, api_keys=api_keys, adapter_roots=roots, engine=engine, pinned=pinned,
        runs_dir=str(runs_dir) if runs_dir is not None else None, **server_fields,
        experiments=_mapping(config, "experiments"), state_dir=str(state_dir) if state_dir else None,
        tenant_limits=TenantLimits(merged.get("tenant_max_running"), merged.get("tenant_max_queued")),
    )


def load_config(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ServeConfigError(f"cannot read --config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ServeConfigError(f"--config {path} is not valid YAML: {err}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ServeConfigError(f"--config {path} must hold a mapping of settings")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ServeConfigError(f"--config {path}: unknown setting(s) {unknown}; known: {', '.join(sorted(KNOWN_KEYS))}")
    return raw


def _mapping(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ServeConfigError(f"config `{key}` must be a mapping, got {type(value).__name__}")
    return value


def _relative_to(base: Path, path: str | Path) -> Path:
    """Paths in a config file are relative to the file, as users expect when they move both."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path

