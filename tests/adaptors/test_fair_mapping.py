"""Fair Mapping: the `mapping` adaptor kind, its keyword detector, and the `fair_mapping` trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptors.assign import class_texts_for
from adaptors.cache import AdaptorCache
from adaptors.mapping import KeywordDetector, MappingAdaptor, ResidualMap, base_embeddings
from adaptors.store import AdaptorStore
from adaptors.trainers import TRAINERS, get_trainer
from adaptors.trainers.fair_mapping import build_losses, token_alignment
from common.finetune_config import FairMappingConfig
from common.schemas import FinetuneJob
from tests.adaptors.mixin import AdaptorTesterMixin, manifest_for

DOCTOR = "a photo of the face of a doctor, a person"
NURSE = "a photo of the face of a nurse, a person"
FEMALE_DOCTOR = "a photo of the face of a female doctor, a person"
TARGET = {"gender": {"female": 0.5, "male": 0.5}}
# plumbing settings: 2 evaluation steps are too rough for the gates to judge (test_subject_gate), so they are off here
TINY = {"iterations": 40, "eval_images": 2, "eval_steps": 2, "min_subject_kept": 0, "min_fairness_gain": 0}


def _detector(*extra: str) -> KeywordDetector:
    return KeywordDetector.build(class_texts_for("testbed"), ["gender"], extra)


def make_mapping(pipe, adaptor_id: str, seed: int, depth: int = 2) -> MappingAdaptor:
    """A map with seeded, non-zero weights (a fresh one is the identity)."""
    torch.manual_seed(seed)
    module = ResidualMap(pipe.text_encoder.config.hidden_size, depth)
    for layer in module.layers:
        torch.nn.init.normal_(layer.weight, std=0.3)
    return MappingAdaptor.build(manifest_for(adaptor_id, "mapping"), module, _detector())


class TestMappingAdaptor(AdaptorTesterMixin):
    kind = "mapping"

    def make(self, pipe, adaptor_id, seed):
        return make_mapping(pipe, adaptor_id, seed)

    def test_a_fresh_map_is_the_identity(self, pipe):
        h = base_embeddings(pipe, [DOCTOR])
        assert torch.equal(ResidualMap(h.shape[-1], 3)(h), h)

    def test_changes_a_neutral_prompt_and_leaves_a_prompt_naming_a_class_untouched(self, pipe):
        adaptor = self.make(pipe, "a", 1)
        adaptor.attach(pipe)
        prompts = [DOCTOR, FEMALE_DOCTOR, NURSE]
        with torch.no_grad():
            base, mapped = base_embeddings(pipe, prompts), adaptor.prompt_encoder(pipe)(prompts)
        assert (mapped[0] - base[0]).abs().max() > 1e-3 and (mapped[2] - base[2]).abs().max() > 1e-3
        assert torch.equal(mapped[1], base[1])
        assert adaptor.application(DOCTOR)["applied"] is True
        skipped = adaptor.application(FEMALE_DOCTOR)
        assert skipped["applied"] is False and "'female'" in skipped["reason"]

    def test_refuses_tensors_that_are_not_a_map(self, pipe):
        with pytest.raises(ValueError, match="layers"):
            MappingAdaptor(manifest_for("a", "mapping"), {"prefix": torch.zeros(2, 64)})
        bad = {k: v.clone() for k, v in self.make(pipe, "a", 1).tensors.items()}
        bad["layers.0.bias"][0] = float("nan")
        with pytest.raises(ValueError, match="finite"):
            MappingAdaptor(manifest_for("a", "mapping"), bad)


def test_the_detector_matches_whole_class_words_and_the_configured_list():
    det = _detector("woman", "Men")
    assert det.find(FEMALE_DOCTOR) == ["female"]
    assert det.find("a photo of the face of a male nurse") == ["male"]  # not the "male" inside "female"
    assert det.find(DOCTOR) == []
    assert det.find("a WOMAN doctor and two men") == ["men", "woman"]
    assert det.find("a womanly doctor") == []
    tone = KeywordDetector.build(class_texts_for("testbed"), ["skin_tone"])
    assert tone.find("a doctor, a person with skin tone ii") == ["skin tone ii"]
    assert tone.find(FEMALE_DOCTOR) == []


def test_the_variants_are_compared_on_the_same_words():
    # "a female doctor" inserts one token after "a": later positions shift by one; the last one runs off the end
    index, mask = token_alignment([1, 2, 3, 4], [1, 2, 9, 3, 4], 6, aligned=True)
    assert index == [0, 1, 3, 4, 5, 5] and mask == [1, 1, 1, 1, 1, 0]
    assert token_alignment([1, 2], [1, 9, 2], 3, aligned=False) == ([0, 1, 2], [1.0, 1.0, 1.0])


def test_config_checks():
    assert FairMappingConfig.from_hyperparameters({"skip_keywords": " woman, Man ,,"}).keywords() == ["woman", "man"]
    for bad, field in (({"depth": 0}, "depth"), ({"lr": -1}, "lr"), ({"fair_weight": 1e9}, "fair_weight"),
                       ({"iterations": 1.5}, "iterations"), ({"layers": 2}, "unknown")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            FairMappingConfig.from_hyperparameters(bad)


def _job(prompts=(DOCTOR, NURSE), target=None, **hp) -> FinetuneJob:
    return FinetuneJob(method="fair_mapping", base_model="testbed", fairness_target=target or TARGET,
                       prompts=list(prompts), hyperparameters={**TINY, **hp}, name="Fair doctors")  # fmt: skip


def test_training_lowers_the_fair_distance_and_publishes_an_adaptor_that_round_trips(pipe, classifier, tmp_path: Path):
    assert "fair_mapping" in TRAINERS
    store = AdaptorStore(tmp_path / "store")
    staging = store.staging_dir("fair-map")
    seen: list[dict] = []
    manifest = get_trainer("fair_mapping")(_job(), pipe, classifier, staging, tmp_path / "ckpt", seen.append, lambda: False)
    fair = manifest.metrics["fair_distance"]
    assert fair["end"] < 0.5 * fair["start"], fair
    assert seen and seen[-1]["iteration"] == TINY["iterations"] and seen[-1]["fair_distance"] == fair["end"]
    assert {"before", "after", "semantics", "eval_prompts"} <= set(manifest.metrics)
    assert "mean_prompt_tv" in manifest.metrics["after"] and manifest.metrics["after"]["prompts"].keys() == {DOCTOR, NURSE}

    published = store.publish(staging)
    assert published.id == "fair-map" and published.kind == "mapping" and published.size_bytes > 0
    loaded = store.load("fair-map")  # verifies the sha256 first
    assert isinstance(loaded, MappingAdaptor)
    assert loaded.detector.keywords == ("female", "male")
    cache = AdaptorCache(pipe, store, max_bytes=1 << 20, base_model="testbed")
    encoder = cache.use("fair-map")
    assert encoder is not None
    with torch.no_grad():
        base = base_embeddings(pipe, [DOCTOR, FEMALE_DOCTOR])
        mapped = encoder([DOCTOR, FEMALE_DOCTOR])
    assert (mapped[0] - base[0]).abs().max() > 1e-4 and torch.equal(mapped[1], base[1])
    assert cache.application("fair-map", DOCTOR)["applied"] and not cache.application("fair-map", FEMALE_DOCTOR)["applied"]


def test_the_weighted_term_pulls_towards_the_favoured_group(pipe):
    texts = class_texts_for("testbed")
    classes = {"gender": ["female", "male"]}
    uneven = build_losses(pipe, [DOCTOR], {"gender": {"female": 0.3, "male": 0.7}}, classes, texts)
    assert torch.allclose(uneven.weights["gender"], torch.tensor([0.6, 1.4]))
    even = build_losses(pipe, [DOCTOR], TARGET, classes, texts)
    assert torch.equal(even.weights["gender"], torch.ones(2))


def test_training_refuses_a_prompt_that_names_a_group(pipe, classifier, tmp_path: Path):
    with pytest.raises(ValueError, match="names a group"):
        get_trainer("fair_mapping")(_job(prompts=(DOCTOR, FEMALE_DOCTOR)), pipe, classifier, tmp_path / "s", tmp_path / "c",
                                    lambda _: None, lambda: False)  # fmt: skip


def test_training_stops_when_asked(pipe, classifier, tmp_path: Path):
    from adaptors.generation import GenerationCancelled

    with pytest.raises(GenerationCancelled):
        get_trainer("fair_mapping")(_job(), pipe, classifier, tmp_path / "s", tmp_path / "c", lambda _: None, lambda: True)
