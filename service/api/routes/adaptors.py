"""GET /v1/adaptors[/{id}]: the adaptor store's manifests (read from disk, no weights loaded)."""

from __future__ import annotations

from fastapi import APIRouter

from common import adaptor_manifest
from service.api.deps import CallerDep, SettingsDep
from service.errors import error_responses
from service.schemas import AdaptorList, AdaptorPublic
from service.validation import load_manifest

router = APIRouter(prefix="/v1/adaptors", tags=["adaptors"])


@router.get("", response_model=AdaptorList, responses=error_responses(401, 403))
def list_adaptors(settings: SettingsDep, _tenant: CallerDep) -> AdaptorList:
    """Every published adaptor: kind, base model, attributes, trained target, metrics, files, size, created."""
    manifests = adaptor_manifest.list_manifests(settings.adaptor_dir)
    return AdaptorList(data=[AdaptorPublic.model_validate(m.to_dict()) for m in manifests])


@router.get("/{adaptor_id}", response_model=AdaptorPublic, responses=error_responses(401, 403, 404, 409))
def get_adaptor(adaptor_id: str, settings: SettingsDep, _tenant: CallerDep) -> AdaptorPublic:
    return AdaptorPublic.model_validate(load_manifest(settings.adaptor_dir, adaptor_id, "id").to_dict())
