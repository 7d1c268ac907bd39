"""Request dependencies: settings, the job store, the Celery sender, and authentication.

Everything hangs off `app.state` (set by `create_app`), so tests build an app per settings
object and nothing is global.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.jobs import JobStore
from common.settings import Settings
from service.errors import Forbidden, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="Admin token (admin routes) or API key (when API keys are set).")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery()


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a token matched."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("admin routes need 'Authorization: Bearer <admin token>'", headers=_CHALLENGE)
    if not _same(credentials.credentials, settings.admin_token):
        raise Forbidden("the admin token is not valid")


def api_keys(settings: Settings) -> list[str]:
    return [k.strip() for k in settings.api_keys.split(",") if k.strip()]


def tenant(settings: SettingsDep, credentials: Credentials) -> str:
    """The caller's scope for idempotency keys: a hash of its API key, or 'anon' when keys are off.

    With `FAIRDIFF_API_KEYS` set, /v1 routes need one of them as a bearer token.
    """
    keys = api_keys(settings)
    if not keys:
        return "anon"
    if credentials is None or not credentials.credentials:
        raise Unauthorized("this gateway needs 'Authorization: Bearer <API key>'", headers=_CHALLENGE)
    given = credentials.credentials
    # Compare against every key (no early exit), so timing does not reveal which key matched.
    matched = [k for k in keys if _same(given, k)]
    if not matched:
        raise Forbidden("the API key is not valid")
    return "key-" + hashlib.sha256(matched[0].encode("utf-8")).hexdigest()[:16]


AdminDep = Annotated[None, Depends(require_admin)]
TenantDep = Annotated[str, Depends(tenant)]
