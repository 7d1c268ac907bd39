"""One generate request served in this process, with no gateway and no job store: what `fairdiff generate` runs.

It takes the same validated request as the inference worker (common.schemas.GenerateJob), decides its
strategy with the same `decide`, and returns a result of the same shape as a job's `result` (docs/api.md),
with local file names instead of URLs. The ledger, when asked for, lives in the Redis the settings name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from common.schemas import GenerateJob, Strategy
from workers.strategy import Decision, decide


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


def _assigned_counts(assignment: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for classes in assignment:
        for attr, cls in classes.items():
            counts.setdefault(attr, {}).setdefault(cls, 0)
            counts[attr][cls] += 1
    return counts


def render(model: LocalModel, req: GenerateJob, redis_client: Any = None) -> tuple[Any, dict[str, Any]]:
    """(images in [0, 1], result). Raises workers.strategy.StrategyError when the strategy cannot serve the request,
    and the adaptor store's errors (common.adaptor_manifest) for an unusable adaptor."""
    from adaptors.assign import class_texts_for, generate_assigned, generate_directed, joint_assignment
    from adaptors.audit import audit, summarise
    from adaptors.enforce import enforce
    from adaptors.generation import GenerationSpec, generate
    from common.adaptor_matching import base_model_names
    from common.settings import get_settings
    from workers import ledger

    settings = get_settings()
    t_start = time.perf_counter()
    manifests = (model.store.list() if model.store else []) if req.fairness_target and not req.adaptor_id else None
    decision: Decision = decide(req.strategy, req.fairness_target, req.adaptor_id, manifests,
                                base_model_names(model.name), req.prompt, req.steps, req.guidance_scale)  # fmt: skip
    encoder = directions = None
    if decision.adaptor_id is not None:
        if model.cache is None:
            from common.adaptor_manifest import AdaptorNotFound

            raise AdaptorNotFound(f"no adaptor {decision.adaptor_id!r}: there is no adaptor store at {settings.adaptor_dir}")
        encoder = model.cache.use(decision.adaptor_id)
        directions = model.cache.directions(decision.adaptor_id, req.prompt)
    load_s = time.perf_counter() - t_start
    spec = GenerationSpec(prompt=req.prompt, num_images=req.num_images, seed=req.seed, steps=req.steps,
                          guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt)  # fmt: skip
    assignment = audited = reserved = lid = None
    enforcement: dict[str, Any] | None = None
    if req.enforce and decision.used != Strategy.assign.value:
        enforcement = {"applied": False, "reason": f"enforcement needs strategy 'assign'; this request used {decision.used!r}"}
    t1 = time.perf_counter()
    if decision.used == Strategy.assign.value and req.fairness_target:
        texts = class_texts_for(model.name)
        if req.ledger and redis_client is not None:
            lid = ledger.ledger_id(req.ledger_scope, req.ledger, req.prompt, req.fairness_target)
            reserved = ledger.reserve(redis_client, lid, req.num_images, req.fairness_target, settings.job_ttl_s)
        assignment = [dict(a) for a in (reserved or joint_assignment(spec.num_images, req.fairness_target, spec.seed))]
        options = {"mode": settings.assign_mode, "guidance_weight": settings.assign_guidance_weight,
                   "max_batch": settings.max_batch, "classifier_scale": settings.assign_classifier_scale}  # fmt: skip
        try:
            images = generate_assigned(model.pipe, spec, assignment, texts, classifier=model.classifier, **options)
            if req.enforce and model.classifier is not None:
                images, audited, report = enforce(model.pipe, model.classifier, spec, assignment, texts, images,
                                                  max_rounds=settings.enforce_max_rounds, **options)  # fmt: skip
                enforcement = {"applied": True, **report.to_dict()}
        except BaseException:
            if lid and reserved:  # nothing was delivered: release the reservation
                ledger.settle(redis_client, lid, reserved, [], list(req.fairness_target))
            raise
    elif directions is not None:
        images = generate_directed(model.pipe, spec, [directions.rows] * spec.num_images, directions.warmup_steps,
                                   None, settings.max_batch)  # fmt: skip
    else:
        images = generate(model.pipe, spec, max_batch=settings.max_batch, encode_prompt=encoder)
    generate_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    report = None
    if req.audit and model.classifier is not None:
        if audited is not None:
            report = summarise(audited, model.classifier.attributes, req.fairness_target).to_dict()
        else:
            report = audit(model.classifier, images, req.fairness_target).to_dict()
    audit_s = time.perf_counter() - t2
    ledger_state = None
    if lid and reserved is not None:
        attrs = list(req.fairness_target or {})
        if report is not None:  # count what the audit saw, so conditioning misses are made up later
            got = [{a: img["attributes"][a]["class"] for a in attrs} if img["person"] else None for img in report["images"]]
        else:
            got = list(reserved)
        ledger.settle(redis_client, lid, reserved, got, attrs)
        ledger_state = {"key": req.ledger, "delivered": ledger.delivered(redis_client, lid)}
    per_image = report["images"] if report else [None] * len(images)
    result: dict[str, Any] = {
        "images": [
            {
                "file": f"image_{k:03d}.png",
                "seed_index": k,
                "attributes": img["attributes"] if img else None,
                "person": img["person"] if img else None,
                "person_confidence": img["person_confidence"] if img else None,
                "assigned": assignment[k] if assignment else None,
            }
            for k, img in enumerate(per_image)
        ],
        "prompt": req.prompt,
        "seed": req.seed,
        "steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "model": model.name,
        "target": req.fairness_target,
        "realised": report["realised"] if report else None,
        "counts": report["counts"] if report else None,
        "bias": report["bias"] if report else None,
        "no_person": report["no_person"] if report else None,
        "target_distance": (report["target_distance"] or None) if report else None,
        "audited": report is not None,
        "assigned_counts": _assigned_counts(assignment) if assignment else None,
        "enforcement": enforcement,
        "ledger": ledger_state,
        "strategy": decision.to_dict(),
        "adaptor": decision.adaptor_id,
        "adaptor_application": model.cache.application(decision.adaptor_id, req.prompt) if model.cache else None,
        "timings": {
            "load_s": round(load_s, 4),
            "generate_s": round(generate_s, 4),
            "audit_s": round(audit_s, 4),
            "total_s": round(time.perf_counter() - t_start, 4),
        },  # fmt: skip
    }
    return images, result


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
