"""Hostile inputs: text that cannot be encoded, and hyperparameters past their upper bounds, are 422s naming the field."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from fastapi.testclient import TestClient

from common.finetune_config import DFTConfig, FairMappingConfig, IDAConfig, upper_bounds
from tests.service.helpers import PROMPT, assert_error

LONE = "\\ud83d"  # as JSON writes it: a lone UTF-16 surrogate, valid JSON, invalid Unicode
TARGET = {"gender": {"female": 0.5, "male": 0.5}}


def post_raw(client: TestClient, path: str, body: dict, lone: dict[str, str], headers: dict[str, str] | None = None):
    """POST `body` with each `lone` placeholder replaced by the raw escape (json.dumps would escape the backslash)."""
    text = json.dumps(body)
    for placeholder in lone:
        text = text.replace(placeholder, LONE)
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json", **(headers or {})})


def assert_encodable(resp) -> None:
    resp.text.encode("utf-8")  # the response itself was encodable
    assert "\ud83d" not in resp.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "@@"}, "prompt"),
        ({"prompt": PROMPT, "negative_prompt": "blurry @@"}, "negative_prompt"),
        ({"prompt": PROMPT, "fairness_target": {"@@": {"a": 1.0}}}, "fairness_target"),
        ({"prompt": PROMPT, "fairness_target": {"gender": {"@@": 1.0}}}, "fairness_target"),
        ({"prompt": PROMPT, "adaptor_id": "@@"}, "adaptor_id"),
    ],
)
def test_unpaired_surrogates_in_generate_are_422(client: TestClient, body: dict, param: str) -> None:
    resp = post_raw(client, "/v1/generate", body, {"@@": LONE})
    assert_error(resp, 422, param)
    assert_encodable(resp)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompts": [PROMPT, "a @@"]}, "prompts.1"),
        ({"prompt_set": "testbed-train", "eval_prompts": ["@@"]}, "eval_prompts.0"),
        ({"prompt_set": "testbed-train", "fairness_target": {"gender": {"@@": 1.0}}}, "fairness_target"),
        ({"prompt_set": "testbed-train", "name": "@@"}, "name"),
        ({"prompt_set": "testbed-train", "hyperparameters": {"@@": 1}}, "hyperparameters"),
        ({"prompt_set": "testbed-train", "hyperparameters": {"train": "@@"}}, "hyperparameters"),
    ],
)
def test_unpaired_surrogates_in_finetunes_are_422(client: TestClient, admin: dict[str, str], extra: dict, param: str) -> None:
    body = {"method": "dft", "fairness_target": TARGET, **extra}
    resp = post_raw(client, "/v1/admin/finetunes", body, {"@@": LONE}, headers=admin)
    assert_error(resp, 422, param)
    assert_encodable(resp)


def test_error_messages_never_echo_unencodable_text(client: TestClient) -> None:
    resp = client.get("/v1/jobs/%ED%A0%BD")  # a percent-encoded lone surrogate in the path
    assert resp.status_code == 404
    assert_encodable(resp)
    resp = client.get("/v1/adaptors/%ED%A0%BDx")
    assert resp.status_code == 404
    assert_encodable(resp)


def test_paired_surrogates_are_ordinary_text(client: TestClient) -> None:
    text = json.dumps({"prompt": PROMPT, "negative_prompt": "x"}).replace('"x"', '"\\ud83d\\ude00"')  # an emoji
    resp = client.post("/v1/generate", content=text.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 202, resp.text


def _numeric(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.type in ("int", "float")]


@pytest.mark.parametrize("cls", [DFTConfig, IDAConfig, FairMappingConfig])
def test_every_numeric_hyperparameter_has_an_upper_bound(cls: type) -> None:
    assert sorted(_numeric(cls)) == sorted(upper_bounds(cls))


@pytest.mark.parametrize(("method", "cls"), [("dft", DFTConfig), ("ida", IDAConfig), ("fair_mapping", FairMappingConfig)])
def test_hyperparameters_over_their_bound_are_422_naming_them(client: TestClient, admin: dict[str, str], method: str,
                                                              cls: type) -> None:  # fmt: skip
    for key, bound in upper_bounds(cls).items():
        value = int(bound) + 1 if isinstance(getattr(cls(), key), int) else bound * 2 + 1
        body = {"method": method, "fairness_target": TARGET, "prompt_set": "testbed-train", "hyperparameters": {key: value}}
        resp = client.post("/v1/admin/finetunes", json=body, headers=admin)
        err = assert_error(resp, 422, f"hyperparameters.{key}", "invalid_hyperparameters")
        assert "at most" in err["message"], err


def test_the_attack_values_are_refused(client: TestClient, admin: dict[str, str]) -> None:
    for key, value in (("iterations", 10**18), ("rank", 10**9)):
        body = {"method": "dft", "fairness_target": TARGET, "prompt_set": "testbed-train", "hyperparameters": {key: value}}
        assert_error(client.post("/v1/admin/finetunes", json=body, headers=admin), 422, f"hyperparameters.{key}")


def test_the_bounds_are_in_openapi(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["FinetuneRequest"]["properties"]["hyperparameters"]
    assert schema["x-maximum"]["dft"]["iterations"] == upper_bounds(DFTConfig)["iterations"]
    assert schema["x-maximum"]["ida"]["max_iterations"] == upper_bounds(IDAConfig)["max_iterations"]
