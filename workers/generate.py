"""The generate task's body: claim the job, prepare it, then render it alone or in a shared pass.

workers/inference.py holds the steps of one job and workers/batching.py the shared pass; this module
only chooses between them, so neither imports the other's caller.
"""

from __future__ import annotations

from common.jobs import JobStore
from workers import batching
from workers.inference import prepare_step, run_prepared
from workers.lifecycle import claim
from workers.runtime import Runtime, get_runtime


def run_generate(jobs: JobStore, job_id: str, worker: str, runtime: Runtime | None = None) -> str:
    """Run one generate job to a final state; returns that state's name (for logs and tests).

    The steps: claim, decide, load, reserve (ledger), render (+ enforce), publish, audit, settle, result.
    A step that ends the job raises JobFailed with the error body the job records. A job that can share a
    denoising pass runs in a batch with the compatible jobs waiting beside it (workers/batching.py).
    """
    job, outcome = claim(jobs, job_id, worker, "generate")
    if job is None:
        return str(outcome)
    runtime = runtime or get_runtime()
    prepared = prepare_step(jobs, job, runtime)
    if isinstance(prepared, str):
        return prepared
    if batching.batch_key(runtime, prepared.req, prepared.decision) is not None and batching.shares_weights_only(prepared):
        return batching.run_batch(jobs, runtime, worker, prepared)
    return run_prepared(jobs, runtime, prepared)
