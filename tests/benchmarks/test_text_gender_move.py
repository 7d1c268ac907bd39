"""fairness_dft's `text_gender_move`: a change of the table by a known share of the exact rule reads as that share."""

import pytest
import torch


@pytest.mark.parametrize("model", ["testbed-neutral-looks", "testbed-shared-axes"])
def test_a_move_by_a_share_of_the_rule_reads_as_that_share(model):
    from adaptors.generation import load_pipeline
    from benchmarks.fairness_dft import gender_readout, held_out_rows, text_gender_moves
    from benchmarks.shared_axis_ceiling import shared_axes
    from testbed.shared_axis import occupation_words
    from testbed.world import TEST_OCCUPATIONS

    pipe = load_pipeline(model, device="cpu")
    words = occupation_words(model)
    axis, before = gender_readout(pipe, model), held_out_rows(pipe)
    ids, coords, axes, _ = shared_axes(pipe, words)
    share = {"senator": 0.5, "secretary": 1.0, "mechanic": -0.25, "librarian": 0.0}
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i, (row, word) in enumerate(zip(ids, words, strict=True)):
            if word.name in TEST_OCCUPATIONS:  # the rule takes the gender coordinate out; move by a share of it
                table[row] -= torch.as_tensor(share[word.name] * coords[i, 0] * axes[0], dtype=table.dtype)
            else:  # other words' moves must not count
                table[row] += torch.as_tensor(axes[0], dtype=table.dtype)
    moves = text_gender_moves(pipe, axis, before)
    assert moves == pytest.approx(share, abs=2e-3)
    assert gender_readout(pipe, "testbed") is None  # the main testbed has no shared axis
