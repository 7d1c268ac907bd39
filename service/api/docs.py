"""Swagger UI at /docs and ReDoc at /redoc, served from local assets so they work with no network, and the typed
parts of /openapi.json that FastAPI cannot derive from the routes.

The JavaScript and CSS come from the `fastapi-offline` wheel (its `static/` folder), mounted at /docs-static;
FastAPI's own pages would load them from a CDN and show a blank page offline.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/docs-static"


def static_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Mount the assets and add /docs, /docs/oauth2-redirect and /redoc (the app is built with docs_url=None)."""
    app.mount(STATIC_URL, StaticFiles(directory=static_dir()), name="docs-static")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no call to the public validator
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )


def install_typed_openapi(app: FastAPI, finetune_path: str = "/v1/admin/finetunes") -> None:
    """/openapi.json with each finetune method's hyperparameters typed (service.contracts), the request body of
    `POST finetune_path` being one schema per method, discriminated by `method`, and examples of the generate,
    job and finetune responses.

    The route still takes the body as one model and checks hyperparameters with the trainers' own rules, so its
    errors stay `invalid_hyperparameters` naming `hyperparameters.<key>`; this only describes what it accepts."""
    from pydantic.json_schema import models_json_schema

    from service import contracts
    from service.contracts import HYPERPARAMETERS

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema([(m, "validation") for m in HYPERPARAMETERS.values()],
                                     ref_template="#/components/schemas/{model}")  # fmt: skip
        components.update(defs.get("$defs", {}))
        operation = schema["paths"][finetune_path]["post"]
        body = operation["requestBody"]["content"]["application/json"]
        base = components[body["schema"]["$ref"].rsplit("/", 1)[1]]
        mapping = {}
        for method, model in HYPERPARAMETERS.items():
            name = f"FinetuneRequest_{method}"
            variant = {**base, "title": name, "properties": dict(base["properties"])}
            variant["properties"]["method"] = {"type": "string", "const": method, "enum": [method], "title": "Method"}
            variant["properties"]["hyperparameters"] = {"$ref": f"#/components/schemas/{model.__name__}"}
            variant["required"] = sorted({*base.get("required", []), "method"})
            components[name] = variant
            mapping[method] = f"#/components/schemas/{name}"
        body["schema"] = {"oneOf": [{"$ref": ref} for ref in mapping.values()],
                          "discriminator": {"propertyName": "method", "mapping": mapping}}  # fmt: skip
        body["examples"] = {m: {"summary": f"method {m}", "value": v} for m, v in contracts.FINETUNE_REQUEST_EXAMPLES.items()}
        examples = {
            ("/v1/generate", "post", "202"): contracts.GENERATE_ACCEPTED_EXAMPLE,
            ("/v1/generate", "post", "200"): contracts.JOB_EXAMPLE,
            ("/v1/jobs/{job_id}", "get", "200"): contracts.JOB_EXAMPLE,
            (finetune_path, "post", "202"): {**contracts.GENERATE_ACCEPTED_EXAMPLE, "url": contracts.FINETUNE_EXAMPLE["url"]},
            (finetune_path + "/{job_id}", "get", "200"): contracts.FINETUNE_EXAMPLE,
        }
        for (path, verb, status), example in examples.items():
            response = schema["paths"].get(path, {}).get(verb, {}).get("responses", {}).get(status)
            if response is not None:
                response.setdefault("content", {}).setdefault("application/json", {})["example"] = example
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
