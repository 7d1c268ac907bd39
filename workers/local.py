"""One generate request served in this process, with no gateway and no job store: what `fairdiff generate` runs.

It takes the same validated request as the inference worker (common.schemas.GenerateJob), decides its
strategy with the same `decide`, and returns a result of the same shape as a job's `result` (docs/api.md),
with local file names instead of URLs. The ledger, when asked for, lives in the Redis the settings name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from common.schemas import GenerateJob


@dataclass
class LocalModel:
    """The base pipeline, its classifier (None when none is configured) and the adaptor store (None when its folder
    does not exist: generating never creates one), loaded once."""

    name: str
    pipe: Any
    classifier: Any | None
    store: Any | None
    cache: Any | None


def load_local_model(name: str) -> LocalModel:
    from adaptors.cache import AdaptorCache
    from adaptors.store import AdaptorStore
    from common.settings import get_settings
    from workers.console import load_model

    settings = get_settings()
    _, pipe, classifier = load_model(name)
    if not settings.adaptor_dir.is_dir():
        return LocalModel(name, pipe, classifier, None, None)
    store = AdaptorStore(settings.adaptor_dir)
    return LocalModel(name, pipe, classifier, store, AdaptorCache(pipe, store, settings.adaptor_cache_bytes, base_model=name))


def prompt_tokens(model: LocalModel, text: str) -> tuple[int, int]:
    """(tokens including the begin/end markers, the most the text encoder takes): the gateway's length rule."""
    tokenizer = model.pipe.tokenizer
    return len(tokenizer(text).input_ids), int(tokenizer.model_max_length)


def render(model: LocalModel, req: GenerateJob, redis_client: Any = None) -> tuple[Any, dict[str, Any]]:
    """(images in [0, 1], result), by the inference worker's own steps (workers.inference): the same decision, the same
    rendering, enforcement, audit and ledger. Raises workers.inference.JobFailed with the error body a job would record."""
    from adaptors.generation import GenerationSpec
    from common.settings import get_settings
    from workers import inference
    from workers.runtime import Runtime

    settings = get_settings()
    runtime = Runtime(settings, model.pipe, model.classifier, model.store, model.cache, 0.0, auditor=model.classifier)
    t_start = time.perf_counter()
    decision = inference.decide_step(runtime, req)
    encoder, directions = inference.load_step(runtime, decision, req.prompt)
    load_s = time.perf_counter() - t_start
    spec = GenerationSpec(prompt=req.prompt, num_images=req.num_images, seed=req.seed, steps=req.steps,
                          guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt)  # fmt: skip
    hold = inference.reserve_step(redis_client, runtime, req, decision) if redis_client is not None else None
    try:
        rendered = inference.render_step(runtime, req, decision, spec, encoder, directions, hold, None)
        inference.check_enforcement_step(req, rendered)
    except BaseException:
        if hold is not None:  # nothing was delivered: release the reservation
            inference.release_step(redis_client, req, hold)
        raise
    t2 = time.perf_counter()
    report = inference.audit_step(runtime, req, rendered)
    audit_s = time.perf_counter() - t2
    ledger_state = inference.settle_step(redis_client, req, hold, report)
    timings = {"load_s": load_s, "generate_s": rendered.seconds, "audit_s": audit_s, "total_s": time.perf_counter() - t_start}
    result = inference.build_result("", len(rendered.images), rendered, report, decision, ledger_state, timings)
    result["adaptor_application"] = inference.application_step(model.cache, decision, req.prompt)
    for k, image in enumerate(result["images"]):  # local file names instead of URLs
        image.pop("url", None)
        image["file"] = f"image_{k:03d}.png"
    result.update({"prompt": req.prompt, "seed": req.seed, "steps": req.steps, "guidance_scale": req.guidance_scale,
                   "model": model.name, "target": req.fairness_target})  # fmt: skip
    return rendered.images, result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What `fairdiff generate` prints: the strategy, then per attribute what was delivered against the target."""
    lines = [f"strategy: {result['strategy']['used']} ({result['strategy']['reason']})"]
    if result.get("adaptor"):
        lines.append(f"adaptor: {result['adaptor']}")
        if result.get("adaptor_application"):
            lines.append(f"adaptor applied: {result['adaptor_application']['applied']} "
                         f"({result['adaptor_application']['reason']})")  # fmt: skip
    realised, target = result.get("realised") or {}, result.get("target") or {}
    distance = result.get("target_distance") or {}
    for attr, shares in realised.items():
        delivered = " ".join(f"{c}={v:.2f}" for c, v in shares.items())
        line = f"  {attr:10s} delivered {delivered}"
        if attr in target:
            wanted = " ".join(f"{c}={v:.2f}" for c, v in target[attr].items())
            tv = distance.get(attr, {}).get("total_variation")
            line += f"   target {wanted}" + (f"   TV={tv:.2f}" if tv is not None else "")
        else:
            line += f"   bias={result['bias'][attr]:.2f}"
        lines.append(line)
    if result.get("audited"):
        lines.append(f"  no person found in {result['no_person']} of {len(result['images'])}")
    else:
        lines.append("  not audited: no attribute classifier is configured (FAIRDIFF_CLASSIFIER)")
    if result.get("enforcement"):
        lines.append(f"  enforcement: {result['enforcement']}")
    if result.get("ledger"):
        lines.append(f"  ledger {result['ledger']['key']}: delivered so far {result['ledger']['delivered']}")
    return lines
