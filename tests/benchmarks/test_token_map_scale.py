"""The token-map scale sweep's two readers, on the committed neutral-looks weights."""

import pytest


def test_both_readers_see_the_base_models_stereotypes_and_a_model_without_a_token_map_is_refused():
    from adaptors.classifiers import TestbedAttributeClassifier
    from adaptors.generation import load_pipeline
    from benchmarks.fairness_dft import held_out_images
    from benchmarks.token_map_scale import female_shares, write_parameters

    pipe = load_pipeline("testbed-neutral-looks", device="cpu")
    classifier = TestbedAttributeClassifier()
    shares = female_shares(held_out_images(pipe, None, 16, ("secretary", "mechanic"), (1,), steps=10), classifier)
    secretary, mechanic = shares["secretary"], shares["mechanic"]
    assert min(secretary) > 0.8 and max(mechanic) < 0.2  # (oracle, classifier) female shares
    with pytest.raises(RuntimeError, match="token map"):
        write_parameters(pipe)  # no adaptor attached: nothing to scale
