"""GET /playground: a small page (plain HTML, CSS and JavaScript shipped in the package under service/static) to try
generation with a fairness target, browse the adaptor store and run finetunes. Every asset comes from the gateway:
the page works offline, and its Content-Security-Policy forbids loading anything from another origin.

The page is static: no template, so nothing from the server (settings, tokens) is ever written into it. The API key
and the admin token are typed into the page and kept in its memory only.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/playground/static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["playground"], include_in_schema=False)


def static_dir() -> Path:
    return Path(str(files("service") / "static" / "playground"))


@router.get("/playground")
def playground() -> FileResponse:
    return FileResponse(
        static_dir() / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def install_playground(app: FastAPI) -> None:
    app.mount(STATIC_URL, StaticFiles(directory=static_dir()), name="playground-static")
    app.include_router(router)
