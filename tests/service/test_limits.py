"""Bounded resources: /metrics labels, per-key rate and concurrency limits, `Prefer: wait` holders, work per request."""

from __future__ import annotations

import random
import re
import string

from fastapi.testclient import TestClient

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


def test_metrics_stay_small_under_made_up_methods_and_paths(client: TestClient) -> None:
    rng = random.Random(34)

    def word(n: int) -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=n))

    for i in range(3000):
        method = word(rng.randint(3, 12)).upper() if i % 2 else rng.choice(METHODS)
        path = rng.choice(["/" + word(rng.randint(1, 30)), f"/v1/jobs/{word(32)}", f"/v1/{word(8)}/{word(8)}", "/healthz"])
        client.request(method, path)
    body = client.get("/metrics").text
    assert len(body.encode()) < 100 * 1024, len(body)
    methods = set(re.findall(r'method="([^"]*)"', body))
    routes = set(re.findall(r'route="([^"]*)"', body))
    assert methods <= {*METHODS, "other"}
    assert routes <= {*client.app.openapi()["paths"], "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "unmatched"}
    assert 'method="other"' in body and 'route="unmatched"' in body
    assert 'route="/v1/jobs/{job_id}"' in body
