"""Why the token map's read is confined to the training prompts' span, on the committed neutral-looks weights."""

import pytest


@pytest.mark.parametrize("model", ["testbed-neutral-looks", "testbed-shared-axes"])
def test_the_least_squares_rule_map_reaches_held_out_words_better_when_confined_to_the_span(model):
    from adaptors.generation import load_pipeline
    from benchmarks.token_map_span import fitted_map_figures
    from testbed.shared_axis import occupation_words

    words = occupation_words(model)
    figures = fitted_map_figures(load_pipeline(model, device="cpu"), words)
    assert figures["span_dim"] < figures["training_tokens"] < figures["embedding_dim"]
    free, confined = figures["free"], figures["confined_to_span"]
    assert free["training_relative_error"] < 1e-3 and confined["training_relative_error"] < 1e-3  # both fit the prompts
    assert max(confined["relative_error"].values()) < 0.4 < max(free["relative_error"].values())
    for word, move in figures["rule_gender_move"].items():  # every held-out word moves the rule's way
        assert confined["gender_move"][word] * move > 0
    # reading only the words that vary (token_map_read: varying) costs the rule nothing on the held-out words
    varying = figures["confined_to_varying"]
    assert figures["varying_dim"] < figures["span_dim"] and varying["training_relative_error"] < 1e-3
    for word, error in confined["relative_error"].items():
        assert varying["relative_error"][word] <= error + 0.01
    # the symmetric map's form holds the rule: the gender axis taken out of every token moves each held-out word
    # the rule's way by 0.6 to 1.4 of its move, though it also moves what the rule leaves (the template's words)
    projection = figures["projection_of_the_axis"]
    assert projection["training_relative_error"] > 0.2
    for word, move in figures["rule_gender_move"].items():
        assert 0.6 < projection["gender_move"][word] / move < 1.4
    # token_map_init: measured starts the map near the axis, from the training words and their shares alone; where
    # every look's words average the same shares (neutral looks) the looks cancel and it starts on the axis
    assert figures["measured_axis_cosine"] > (0.99 if model == "testbed-neutral-looks" else 0.75)
