"""The audit names its reader: on the testbed the tiny CLIP audits (and `enforce` checks with it) while the
CNN steers; a profile told to audit with its steering reader says that the audit read its own steering.

In-process: the generate task's body on a real redis-server with the committed testbed, no Celery worker.
"""

from __future__ import annotations

import pytest

from common.celery_config import INFERENCE_QUEUE
from common.jobs import JobStore
from common.schemas import GenerateJob, JobKind, JobState
from common.settings import Settings

TARGET = {"gender": {"female": 0.5, "male": 0.5}}


@pytest.fixture
def jobs(redis_server: str):
    store = JobStore.from_url(redis_server.rsplit("/", 1)[0] + "/5")
    store.r.flushdb()
    yield store
    store.r.close()


def _runtime(tmp_path, **settings):
    from workers.runtime import _build

    return _build(Settings(base_model="testbed", data_dir=tmp_path, max_batch=8, enforce_max_rounds=1, **settings))


def _run(jobs: JobStore, runtime, **request) -> dict:
    from workers.generate import run_generate

    job_id = jobs.create(JobKind.generate, INFERENCE_QUEUE, GenerateJob(**request).to_dict())
    assert run_generate(jobs, job_id, "test-worker", runtime) == JobState.succeeded.value
    return jobs.get(job_id)["result"]


def test_the_testbed_audits_with_its_clip_and_enforces_with_it(jobs, tmp_path, monkeypatch):
    import adaptors.enforce

    runtime = _runtime(tmp_path)
    assert runtime.auditor.name == "testbed-clip" and runtime.classifier.name == "testbed-cnn"
    seen = {}
    real = adaptors.enforce.enforce

    def spy(pipe, classifier, *args, **kwargs):
        seen["checks"], seen["steers"] = classifier.name, kwargs["steer"].name
        return real(pipe, classifier, *args, **kwargs)

    monkeypatch.setattr(adaptors.enforce, "enforce", spy)
    result = _run(jobs, runtime, prompt="a photo of the face of a senator, a person", num_images=4, seed=3, steps=10,
                  fairness_target=TARGET, strategy="assign", enforce=True)  # fmt: skip
    assert result["audit_reader"] == {"name": "testbed-clip", "steered": False}
    assert seen == {"checks": "testbed-clip", "steers": "testbed-cnn"}
    assert result["enforcement"]["applied"] and set(result["images"][0]["attributes"]) == {"gender", "skin_tone", "age"}
    plain = _run(jobs, runtime, prompt="a photo of the face of a nurse, a person", num_images=2, seed=1, steps=10)
    assert plain["audit_reader"] == {"name": "testbed-clip", "steered": False}


def test_auditing_with_the_steering_reader_says_it_steered(jobs, tmp_path):
    runtime = _runtime(tmp_path, audit_reader="classifier")
    assert runtime.auditor is runtime.classifier
    result = _run(jobs, runtime, prompt="a photo of the face of a senator, a person", num_images=2, seed=3, steps=10,
                  fairness_target=TARGET, strategy="assign")  # fmt: skip
    assert result["audit_reader"] == {"name": "testbed-cnn", "steered": True}
    plain = _run(jobs, runtime, prompt="a photo of the face of a nurse, a person", num_images=2, seed=1, steps=10)
    assert plain["audit_reader"] == {"name": "testbed-cnn", "steered": False}
    assert _runtime(tmp_path, audit_reader="none").auditor is None
