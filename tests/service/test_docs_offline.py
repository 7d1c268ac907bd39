"""/docs and /redoc work with no network: their pages load every asset from the gateway itself."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_reference_no_external_host(client: TestClient, page: str) -> None:
    resp = client.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert not re.findall(r"(?:https?:)?//[\w.-]+", resp.text), "the page names another host"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", resp.text) + re.findall(r"""url: ?['"]([^'"]+)['"]""", resp.text)
    assert assets, "the page loads no assets: the test reads it wrongly"
    for asset in assets:
        assert asset.startswith("/"), asset
        assert client.get(asset).status_code == 200, asset


def test_the_openapi_schema_is_still_served_and_the_docs_routes_are_not_in_it(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"]
    assert not {"/docs", "/redoc", "/docs/oauth2-redirect"} & set(schema["paths"])
