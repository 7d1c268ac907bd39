"""GET /v1/models[/{id}]: the base model as its inference workers registered it (attributes and their classes, size,
defaults, prompt sets), in OpenAI's list shape with fairdiff's fields added. The playground builds its target editor
from it."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from common.schemas import ModelInfo, Strategy
from service.api.deps import CallerDep, SettingsDep, StoreDep
from service.errors import NotFound, error_responses
from service.schemas import ModelList, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_public(info: ModelInfo) -> ModelPublic:
    return ModelPublic(
        id=info.base_model,
        attributes=info.attributes,
        height=info.height,
        width=info.width,
        max_tokens=info.max_tokens,
        default_steps=info.default_steps,
        default_guidance_scale=info.default_guidance_scale,
        prompt_sets=sorted(info.prompt_sets),
        strategies=[s.value for s in Strategy],
    )


@router.get("", response_model=ModelList, responses=error_responses(401, 403))
async def list_models(settings: SettingsDep, store: StoreDep, _caller: CallerDep) -> ModelList:
    """The configured base model once a worker has registered it (an empty list before)."""
    info = await run_in_threadpool(store.model_info, settings.base_model)
    return ModelList(data=[model_public(info)] if info else [])


@router.get("/{model_id}", response_model=ModelPublic, responses=error_responses(401, 403, 404))
async def get_model(model_id: str, settings: SettingsDep, store: StoreDep, _caller: CallerDep) -> ModelPublic:
    info = await run_in_threadpool(store.model_info, settings.base_model) if model_id == settings.base_model else None
    if info is None:
        raise NotFound(f"model_id: no registered base model {model_id!r}", param="model_id", code="unknown_model")
    return model_public(info)
