"""Request dependencies: settings, the job store, the Celery sender, and authentication.

Everything hangs off `app.state` (set by `create_app`), so tests build an app per settings
object and nothing is global.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Any

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


def _local_address(request: Request) -> str | None:
    """The address the request arrived on (this server's side of the connection); None for a Unix socket."""
    server = request.scope.get("server")
    return str(server[0]) if server else None


def is_admin_token(request: Request, settings: Settings, given: str) -> bool:
    """Whether `given` is the admin token and may be used here: the well-known default only over loopback."""
    if not _same(given, settings.admin_token):
        return False
    refusal = settings.admin_token_refusal(_local_address(request))
    if refusal is not None:
        raise Forbidden(refusal, code="default_admin_token")
    return True


def require_admin(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("admin routes need 'Authorization: Bearer <admin token>'", headers=_CHALLENGE)
    if not is_admin_token(request, settings, credentials.credentials):
        raise Forbidden("the admin token is not valid")


def api_keys(settings: Settings) -> list[str]:
    return [k.strip() for k in settings.api_keys.split(",") if k.strip()]


ANON = "anon"  # the one tenant of a gateway without API keys
ADMIN_TENANT = "admin"  # what admin-created jobs (finetunes) are owned by


@dataclass(frozen=True)
class Caller:
    """Who is calling /v1: an opaque tenant id (never a function of the key alone, never in a response) and
    whether the caller may see every tenant's jobs (the admin token, when API keys are set)."""

    tenant: str
    sees_all: bool = False

    def owns(self, job: dict[str, Any]) -> bool:
        """Jobs written before ownership existed, or by a keyless gateway, belong to ANON."""
        return self.sees_all or self.tenant == ANON or job.get("owner", ANON) == self.tenant


def tenant_id(settings: Settings, key: str) -> str:
    """The opaque id of an API key: HMAC-SHA256 under the server's secret, so the id reveals nothing about the key
    and cannot be computed from it (or from its plain hash) without the secret."""
    secret = (settings.tenant_secret or "fairdiff-tenant:" + settings.admin_token).encode("utf-8")
    return "t_" + hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def caller(request: Request, settings: SettingsDep, credentials: Credentials) -> Caller:
    """The caller of a /v1 route: ANON when keys are off, else the tenant of its API key.

    With `FAIRDIFF_API_KEYS` set, /v1 routes need one of them (or the admin token, which sees every job) as a
    bearer token.
    """
    keys = api_keys(settings)
    if not keys:
        return Caller(ANON)
    if credentials is None or not credentials.credentials:
        raise Unauthorized("this gateway needs 'Authorization: Bearer <API key>'", headers=_CHALLENGE)
    given = credentials.credentials
    # Compare against every key (no early exit), so timing does not reveal which key matched.
    matched = [k for k in keys if _same(given, k)]
    if matched:
        return Caller(tenant_id(settings, matched[0]))
    if is_admin_token(request, settings, given):
        return Caller(ADMIN_TENANT, sees_all=True)
    raise Forbidden("the API key is not valid")


AdminDep = Annotated[None, Depends(require_admin)]
CallerDep = Annotated[Caller, Depends(caller)]
