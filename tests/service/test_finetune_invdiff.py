"""The admin API's `invdiff` finetune: no fairness_target, a server-side training set, typed hyperparameters."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from common.jobs import JobStore
from tests.service.helpers import assert_error

TARGET = {"gender": {"female": 0.5, "male": 0.5}}


def post(client: TestClient, headers: dict[str, str], **body):
    return client.post("/v1/admin/finetunes", json={"prompt_set": "testbed-train", **body}, headers=headers)


def test_invdiff_takes_a_dataset_and_no_target(client: TestClient, admin: dict[str, str], store: JobStore,
                                               raw_redis: redis.Redis) -> None:  # fmt: skip
    hp = {"dataset": "/srv/data/finetune-set", "groups": 4, "mix_ratio": 0.8}
    resp = post(client, admin, method="invdiff", hyperparameters=hp)
    assert resp.status_code == 202, resp.text
    request = store.get(resp.json()["id"])["request"]
    assert request["method"] == "invdiff" and request["fairness_target"] == {} and request["hyperparameters"] == hp
    assert raw_redis.llen("training") == 1


def test_invdiff_needs_the_admin_token(client: TestClient) -> None:
    assert_error(post(client, {}, method="invdiff"), 401, None, "missing_credentials")


def test_target_rules(client: TestClient, admin: dict[str, str]) -> None:
    assert_error(post(client, admin, method="invdiff", fairness_target=TARGET), 422, "fairness_target",
                 "invalid_fairness_target")  # fmt: skip
    assert_error(post(client, admin, method="dft"), 422, "fairness_target", "invalid_fairness_target")


@pytest.mark.parametrize("hp, param", [
    ({"groups": 1}, "hyperparameters.groups"),
    ({"mix_ratio": 1.5}, "hyperparameters.mix_ratio"),
    ({"variance_weight": -1}, "hyperparameters.variance_weight"),
    ({"dataset": 7}, "hyperparameters.dataset"),
    ({"images": 0}, "hyperparameters.images"),
    ({"train": "unet"}, "hyperparameters"),  # a DFT knob: unknown to invdiff
])  # fmt: skip
def test_bad_invdiff_hyperparameters_are_refused(client: TestClient, admin: dict[str, str], hp: dict, param: str) -> None:
    assert_error(post(client, admin, method="invdiff", hyperparameters=hp), 422, param, "invalid_hyperparameters")
    assert client.get("/v1/admin/finetunes", headers=admin).json()["data"] == []
