"""Domain errors and the handlers that turn every failure into one JSON error shape.

Clients see `{"error": {"message", "type", "param", "code"}}` for every 4xx and 5xx, whatever
raised it (our own checks, pydantic validation, a malformed body, an unexpected bug), so they
can branch on `type`/`code` and show `param` next to the offending field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.schemas import FieldError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """Base of all errors the gateway answers on purpose; subclasses fix status and type."""

    status_code = 400
    type = "invalid_request_error"
    default_code = "invalid_request"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class MalformedRequest(ApiError):
    status_code = 400
    default_code = "malformed_request"


class InvalidField(ApiError):
    """A well-formed request with a bad value; `param` names the field by its JSON path."""

    status_code = 422
    default_code = "invalid_value"

    @classmethod
    def from_field_error(cls, exc: FieldError, code: str = "invalid_value") -> InvalidField:
        return cls(str(exc), param=exc.field, code=code)


class Unauthorized(ApiError):
    status_code = 401
    type = "authentication_error"
    default_code = "missing_credentials"


class Forbidden(ApiError):
    status_code = 403
    type = "permission_error"
    default_code = "invalid_credentials"


class NotFound(ApiError):
    status_code = 404
    type = "not_found_error"
    default_code = "not_found"


class Conflict(ApiError):
    status_code = 409
    type = "conflict_error"
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    default_code = "body_too_large"


class TooManyRequests(ApiError):
    """429: always with Retry-After (seconds)."""

    status_code = 429
    type = "rate_limit_error"
    default_code = "rate_limited"


class ServiceUnavailable(ApiError):
    status_code = 503
    type = "service_unavailable"
    default_code = "unavailable"


class JobFailed(ApiError):
    """500: the job ran and failed; the message and code are the worker's."""

    status_code = 500
    type = "server_error"
    default_code = "job_failed"


class GatewayTimeout(ApiError):
    """504: the job did not finish within the bounded wait; it goes on, at the URL in `Location`."""

    status_code = 504
    type = "timeout_error"
    default_code = "job_not_finished"


def printable(text: str | None) -> str | None:
    """Text that any response can encode: characters UTF-8 cannot hold (lone surrogates from a client's JSON, or
    from a percent-decoded path) become backslash escapes instead of failing the response."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": printable(message), "type": type_, "param": printable(param), "code": printable(code)}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def field_path(loc: Sequence[Any]) -> str | None:
    """pydantic's ('body', 'fairness_target', 'gender', 'male') -> 'fairness_target.gender.male'."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return error_response(MalformedRequest(f"request body is not valid JSON: {reason}", code="invalid_json"))
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(InvalidField(message, param=param, code=str(first.get("type", "invalid_value"))))


_HTTP_TYPES = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge, 429: TooManyRequests}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405s (unknown route, wrong method) in our shape."""
    assert isinstance(exc, StarletteHTTPException)
    cls = _HTTP_TYPES.get(exc.status_code, ApiError)
    err = cls(str(exc.detail), code="http_" + str(exc.status_code), headers=dict(exc.headers or {}) or None)
    err.status_code = exc.status_code
    return error_response(err)


async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return error_response(ServiceUnavailable("the job store (Redis) is unreachable; retry shortly", code="broker_unavailable"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "internal_error", None, "internal_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _broker_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _broker_down)
    app.add_exception_handler(Exception, _unexpected)


# Declared on routes so /docs shows the error shape next to each status a route can answer.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    from service.schemas import ErrorResponse

    descriptions = {
        400: "Malformed request (e.g. invalid JSON)",
        401: "Missing credentials",
        403: "Wrong credentials",
        404: "Not found",
        409: "Conflict",
        413: "Body over the size limit",
        422: "Invalid field; `error.param` names it",
        429: "Over a rate or concurrency limit; retry after `Retry-After` seconds",
        500: "The job failed; `error.code` is the worker's",
        503: "No worker / broker unavailable",
        504: "The job did not finish within the wait; poll the job at `Location`",
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in statuses}
