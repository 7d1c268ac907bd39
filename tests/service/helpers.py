"""Small helpers shared by the gateway tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

PROMPT = "a photo of the face of a nurse, a person"


def gen(client: TestClient, headers: dict[str, str] | None = None, **body: Any):
    return client.post("/v1/generate", json={"prompt": PROMPT, **body}, headers=headers or {})


def assert_error(resp, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    if param:
        assert param.split(".")[0] in err["message"], err
    if code:
        assert err["code"] == code, err
    return err


def write_manifest(root: Path, adaptor_id: str, base_model: str = "testbed", **extra: object) -> Path:
    """A hand-written adaptor manifest, as the store lays it out (`<root>/<id>/manifest.json`)."""
    folder = root / adaptor_id
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "id": adaptor_id,
        "kind": "prefix_tokens",
        "base_model": base_model,
        "attributes": ["gender"],
        "target": {"gender": {"female": 0.5, "male": 0.5}},
        "metrics": {"bias": 0.08},
        "files": {"prefix.safetensors": "0" * 64},
        "size_bytes": 1234,
        "created": "2026-11-23T00:00:00+00:00",
        "hyperparameters": {"steps": 10},
        "prompt_set": "testbed-train",
        "sampler": {"steps": 20},
        "name": "balanced gender",
        **extra,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
