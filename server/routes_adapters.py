"""Adapter admin in vLLM's shape (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, and
`/v1/pin_lora_adapter`, `/v1/unpin_lora_adapter` to keep an adapter resident) and the
OpenAI model list (`/v1/models`: the base, then each adapter with `parent` = the base).

Loading validates the whole adapter in a worker thread (reading safetensors and checking shapes
takes long enough to stall every stream if done on the event loop)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from router.task_table import check_name
from server.deps import AdminDep, GrantDep, StateDep
from server.schemas import AdapterLoaded, LoadLoraAdapterRequest, ModelCard, ModelList, PinLoraAdapterRequest, UnloadLoraAdapterRequest
from server.store_sync import STORE_PREFIX, resolve_store_reference

router = APIRouter()


@router.get("/v1/models")
async def list_models(state: StateDep, grant: GrantDep) -> ModelList:
    cards = [ModelCard(id=state.base_name, created=int(state.started), root=state.base_name)]
    for info in state.engine.adapter_infos():
        if grant.allows_adapter(info.name):
            cards.append(
                ModelCard(
                    id=info.name,
                    created=int(info.created),
                    root=info.path if grant.admin else info.name,  # server paths are for admins only
                    parent=state.base_name,
                    version=info.version,
                    warnings=list(info.warnings),
                )
            )
    return ModelList(data=cards)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, state: StateDep, admin: AdminDep) -> AdapterLoaded:
    name = check_name(body.lora_name, "adapter")
    if isinstance(body.lora_path, str) and body.lora_path.startswith(STORE_PREFIX):
        path = await run_in_threadpool(resolve_store_reference, body.lora_path, state.store)
    else:
        path = await run_in_threadpool(state.guard.resolve, body.lora_path)
    started = time.monotonic()
    try:
        info = await run_in_threadpool(state.engine.register_adapter, name, path)
    except Exception:
        state.metrics.adapter_load.labels("refused").observe(time.monotonic() - started)
        raise
    state.metrics.adapter_load.labels("loaded").observe(time.monotonic() - started)
    verb = "added" if info.version == 1 else f"replaced by version {info.version}"
    return AdapterLoaded(
        name=info.name,
        version=info.version,
        path=info.path,
        rank=info.rank,
        target_modules=list(info.target_modules),
        base_model_name_or_path=info.base_model_name_or_path,
        warnings=list(info.warnings),
        message=f"Success: LoRA adapter {info.name!r} {verb}.",
    )


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, state: StateDep, admin: AdminDep) -> dict:
    await run_in_threadpool(state.engine.unregister_adapter, body.lora_name)
    dangling = state.tasks.tasks_using(body.lora_name)
    message = f"Success: LoRA adapter {body.lora_name!r} removed."
    if dangling:
        message += f" Tasks still routed to it (they answer 404 until re-pointed): {', '.join(dangling)}."
    return {"message": message, "tasks_without_adapter": dangling}


@router.post("/v1/pin_lora_adapter")
async def pin_lora_adapter(body: PinLoraAdapterRequest, state: StateDep, admin: AdminDep) -> dict:
    state.engine.pin_adapter(body.lora_name, True)
    return {"message": f"Success: LoRA adapter {body.lora_name!r} pinned; it stays in a slot until unpinned."}


@router.post("/v1/unpin_lora_adapter")
async def unpin_lora_adapter(body: PinLoraAdapterRequest, state: StateDep, admin: AdminDep) -> dict:
    state.engine.pin_adapter(body.lora_name, False)
    return {"message": f"Success: LoRA adapter {body.lora_name!r} unpinned; it may be evicted when idle."}
