"""What the dashboard shows, as one JSON document per poll, filtered by the caller's grant:
admins see everything; a tenant sees only the adapters and tasks its key allows (and no server
paths), plus the server-wide load figures (queue, rows, slots), which name no one.

Everything comes from the engine (its registry, tiers and `stats()`) and from the server's
Prometheus metrics through `TrafficHistory`; nothing here counts on its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from server.auth import Grant
from server.experiment_runtime import UnknownExperimentError
from server.state import ServerState
from server.traffic_history import Snapshot, TrafficHistory, load_series, series, window


def dashboard_state(state: ServerState, grant: Grant, history: TrafficHistory) -> dict[str, Any]:
    stats = state.engine.stats()
    now = history.read()
    snapshots = history.snapshots()
    adapters = _adapters(state, grant, stats.resident, history)
    visible_adapters = {adapter["name"] for adapter in adapters}
    if grant.admin:
        visible_adapters.add(state.base_name)
    tasks = [
        {"task": task, **route.to_json(), "assignments": now.arms.get(task, {})}
        for task, route in state.tasks.snapshot().items() if grant.allows_task(task)
    ]
    rejected = sum(counts.rejected for name, counts in now.adapters.items() if name in visible_adapters)
    return {
        "viewer": {"tenant": grant.tenant, "admin": grant.admin},
        "server": {
            "base_model": state.base_name,
            "uptime_s": time.time() - state.started,
            "queued": stats.queued,
            "running": stats.running,
            "max_running": stats.max_running,
            "slots_used": len(stats.resident),
            "max_loras": stats.max_loras,
            "rejected_429": rejected,
            "can_load": bool(state.settings.adapter_roots) and grant.admin,
            "adapter_roots": list(state.settings.adapter_roots) if grant.admin else [],
        },
        "adapters": adapters,
        "tasks": tasks,
        "traffic": {
            "window_s": history.window_s,
            "interval_s": history.interval_s,
            "adapters": _traffic(now, snapshots, "adapters", visible_adapters, history.window_s),
            "tasks": _traffic(now, snapshots, "tasks", {task["task"] for task in tasks}, history.window_s),
            "load": load_series([*snapshots, now]),
        },
    }


def experiment_summaries(state: ServerState, grant: Grant) -> list[dict[str, Any]] | None:
    """Each experiment's figures as GET /v1/experiments/{name} gives them; None for a tenant,
    since experiments (their arms name any adapter) are an admin resource like that endpoint."""
    if not grant.admin:
        return None
    summaries = []
    for name in state.experiments.names():
        try:
            summaries.append(state.experiments.summary(name))
        except UnknownExperimentError:
            continue  # deleted since it was listed
    return summaries


def _adapters(state: ServerState, grant: Grant, resident: list, history: TrafficHistory) -> list[dict[str, Any]]:
    tiers = state.engine.tiers
    cpu_sizes = tiers.cpu.sizes()
    pinned = tiers.pinned_names()
    slots = {f"{entry.name}@{entry.version}": entry for entry in resident}
    kept: dict[str, list[int]] = {}
    for old in tiers.registry.kept_infos():
        kept.setdefault(old.name, []).append(old.version)
    rows = []
    for info in state.engine.adapter_infos():
        if not grant.allows_adapter(info.name):
            continue
        entry = slots.get(info.key)
        if entry is not None:
            tier = "slot"
        elif info.key in cpu_sizes:
            tier = "cpu"
        else:
            tier = "disk"
        in_memory = cpu_sizes.get(info.key)
        rows.append({
            "name": info.name,
            "version": info.version,
            # Older versions still in a slot finish the requests that hold them (a hot swap).
            "draining_versions": sorted(e.version for e in resident if e.name == info.name and e.version != info.version
                                        and e.version not in kept.get(info.name, [])),
            # Older versions an experiment pins: still served as NAME@VERSION to that experiment's arm.
            "kept_versions": sorted(kept.get(info.name, [])),
            "tier": tier,
            "slot": entry.slot if entry is not None else None,
            "running": entry.in_use if entry is not None else 0,
            "pinned": info.name in pinned,
            "bytes": in_memory if in_memory is not None else _disk_bytes(info.path),
            "bytes_measured": "memory" if in_memory is not None else "disk",
            "rank": info.rank,
            "target_modules": sorted({module.rpartition(".")[2] for module in info.target_modules}),
            "base_model": info.base_model_name_or_path,
            "warnings": list(info.warnings),
            "created": info.created,
            "last_used": history.last_request_wall.get(info.name),
            "path": info.path if grant.admin else None,  # server paths are for admins only
        })
    return rows


def _disk_bytes(path: str) -> int | None:
    folder = Path(path)
    try:
        return sum(file.stat().st_size for file in folder.glob("adapter_model.*") if file.is_file()) or None
    except OSError:
        return None  # moved or deleted since registration: the table says unknown


def _traffic(now: Snapshot, snapshots: list[Snapshot], kind: str, visible: set[str], window_s: float) -> list[dict[str, Any]]:
    start = next((s for s in snapshots if now.at - s.at <= window_s), None)
    rows = []
    for name, counts in sorted(getattr(now, kind).items()):
        if name not in visible:
            continue
        # Over the window (or since start when the ring is younger than the window).
        if start is not None and now.at - start.at > 0:
            figures = window(getattr(start, kind).get(name), counts, now.at - start.at)
            seconds = now.at - start.at
        else:
            figures, seconds = None, 0.0
        rows.append({
            "name": name,
            "requests": counts.requests,
            "generation_tokens": counts.generation_tokens,
            "rejected_429": counts.rejected if kind == "adapters" else None,  # the error counter has no task label
            "window_seconds": seconds,
            "window": figures.__dict__ if figures is not None else None,
            "series": series([*snapshots, now], name, kind).__dict__,
        })
    return rows
