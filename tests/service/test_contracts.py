"""/openapi.json types each finetune method's hyperparameters and the generate job's result."""

from __future__ import annotations

from dataclasses import fields

import pytest
from fastapi.testclient import TestClient

from common.finetune_config import DFTConfig, FairMappingConfig, IDAConfig, check_hyperparameters
from service.contracts import HYPERPARAMETERS
from service.schemas import FINETUNE_METHODS


def test_one_hyperparameter_model_per_method_mirroring_the_trainers_config():
    assert set(HYPERPARAMETERS) == FINETUNE_METHODS
    assert set(HYPERPARAMETERS["dft"].model_fields) == {f.name for f in fields(DFTConfig)}
    assert set(HYPERPARAMETERS["prefix"].model_fields) == {f.name for f in fields(DFTConfig)} - {"train"}
    assert set(HYPERPARAMETERS["ida"].model_fields) == {f.name for f in fields(IDAConfig)}
    assert set(HYPERPARAMETERS["fair_mapping"].model_fields) == {f.name for f in fields(FairMappingConfig)}
    for method, model in HYPERPARAMETERS.items():
        assert all(f.description for f in model.model_fields.values()), method
        defaults = model().model_dump()
        check_hyperparameters(method, defaults)  # the schema's defaults are values the trainers accept


def test_openapi_types_the_finetune_request_by_method_and_the_job_result(client: TestClient):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/admin/finetunes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "method"
    assert set(body["discriminator"]["mapping"]) == {"dft", "prefix", "ida", "fair_mapping", "gmm", "invdiff"}
    components = schema["components"]["schemas"]
    dft = components["FinetuneRequest_dft"]["properties"]["hyperparameters"]["$ref"].rsplit("/", 1)[1]
    lr = components[dft]["properties"]["lr"]
    assert lr["default"] == 0.0 and lr["minimum"] == 0 and lr["description"]
    assert components[dft]["properties"]["unet_modules"]["enum"] == ["attention", "cross_attention_kv"]
    result = components["JobPublic"]["properties"]["result"]["anyOf"]
    assert {"$ref": "#/components/schemas/GenerateResult"} in result
    image = components["ImageResult"]["properties"]
    assert {"url", "attributes", "person", "assigned"} <= set(image)


@pytest.mark.parametrize("method, hp", [("dft", {"lr": 0.01, "train": "both"}), ("ida", {"step": 5.0})])
def test_a_request_of_the_typed_shape_is_accepted(client: TestClient, admin: dict[str, str], method: str, hp: dict):
    body = {"method": method, "fairness_target": {"gender": {"female": 0.5, "male": 0.5}}, "prompt_set": "testbed-train",
            "hyperparameters": hp}  # fmt: skip
    resp = client.post("/v1/admin/finetunes", json=body, headers=admin)
    assert resp.status_code == 202, resp.text


def test_openapi_has_examples_of_the_generate_job_and_finetune_responses_and_they_fit_the_schemas(client: TestClient):
    from service.contracts import FINETUNE_REQUEST_EXAMPLES, GenerateResult
    from service.schemas import FinetunePublic, FinetuneRequest, JobAccepted, JobPublic

    paths = client.get("/openapi.json").json()["paths"]

    def example(path: str, verb: str, status: str) -> dict:
        return paths[path][verb]["responses"][status]["content"]["application/json"]["example"]

    JobAccepted.model_validate(example("/v1/generate", "post", "202"))
    job = example("/v1/jobs/{job_id}", "get", "200")
    JobPublic.model_validate(job)
    GenerateResult.model_validate(job["result"])
    FinetunePublic.model_validate(example("/v1/admin/finetunes/{job_id}", "get", "200"))
    for method, body in FINETUNE_REQUEST_EXAMPLES.items():
        request = FinetuneRequest.model_validate(body)
        check_hyperparameters(method, request.hyperparameters)


def test_a_job_view_returns_the_workers_result_exactly_as_written():
    """The typed schema documents the result; it never renames (`class`) or fills in keys of what the worker wrote."""
    from service.contracts import JOB_EXAMPLE
    from service.schemas import JobPublic

    result = {**JOB_EXAMPLE["result"], "future_field": 1}
    view = JobPublic.model_validate({**JOB_EXAMPLE, "result": result}).model_dump(mode="json")
    assert view["result"] == result
