"""/playground: a static page whose every asset comes from the gateway, and /v1/models, which it builds its target
editor from."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from common.settings import Settings
from service.api.routes.playground import static_dir
from service.app import create_app
from tests.service.conftest import REPO
from tests.service.helpers import assert_error

_HOST = re.compile(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}|https?://", re.IGNORECASE)


def test_the_playground_is_html_that_references_no_external_host(client: TestClient) -> None:
    resp = client.get("/playground")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", resp.text)
    assert len(assets) >= 2, "the page loads its script and stylesheet"
    for text in [resp.text] + [client.get(a).text for a in assets]:
        assert not _HOST.findall(text.replace("http://www.w3.org/2000/svg", "")), "the page names another host"
    for asset in assets:
        assert asset.startswith("/playground/static/"), asset
        got = client.get(asset)
        assert got.status_code == 200 and got.content, asset


def test_the_page_names_every_endpoint_it_uses_and_they_exist(client: TestClient) -> None:
    js = client.get("/playground/static/app.js").text
    paths = set(client.get("/openapi.json").json()["paths"])
    for used in ("/v1/models", "/v1/generate", "/v1/adaptors", "/v1/admin/finetunes"):
        assert f'"{used}' in js and used in paths, used


def test_the_static_files_ship_in_the_package() -> None:
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    package_data = re.findall(r'"([^"]+)"', re.search(r"^service = \[(.*)\]", section, re.MULTILINE).group(1))
    shipped = {p.name for pattern in package_data for p in (REPO / "service").glob(pattern)}
    assert {"index.html", "app.js", "app.css"} <= shipped
    assert static_dir() == (REPO / "service/static/playground")


def test_models_lists_the_registered_base_model_with_its_attributes(client: TestClient, testbed_info) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["testbed"]
    m = body["data"][0]
    assert m["attributes"] == testbed_info.attributes and (m["width"], m["height"]) == (32, 32)
    assert "testbed-train" in m["prompt_sets"] and "auto" in m["strategies"]
    assert client.get("/v1/models/testbed").json() == m
    assert_error(client.get("/v1/models/sd15"), 404, "model_id", "unknown_model")


def test_models_is_empty_before_a_worker_registers(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/models").json() == {"object": "list", "data": []}


def test_with_api_keys_the_page_is_public_but_models_needs_a_key(settings: Settings, store, testbed_info) -> None:
    store.publish_model(testbed_info)
    keyed = settings.model_copy(update={"api_keys": "k1"})
    with TestClient(create_app(keyed)) as c:
        assert c.get("/playground").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).json()["data"][0]["id"] == "testbed"


def test_the_playground_is_not_in_the_openapi_schema(client: TestClient) -> None:
    assert not any(p.startswith("/playground") for p in client.get("/openapi.json").json()["paths"])
