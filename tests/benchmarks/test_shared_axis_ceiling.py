"""The two-sided rule fit: each side's scale is chosen on the training occupations of that side only."""

from benchmarks.shared_axis_ceiling import two_sided_fit
from testbed.world import OCCUPATION_BY_NAME, TEST_OCCUPATIONS, TRAIN_OCCUPATIONS


def _measured(train_female: dict[str, float], held_female: dict[str, float]) -> dict:
    return {"training_female_share": train_female, "held_out_female_share": held_female}


def test_each_side_takes_the_scale_that_fits_its_own_training_occupations():
    male_leaning = [o for o in TRAIN_OCCUPATIONS if OCCUPATION_BY_NAME[o].p_female < 0.5]
    # at scale 1 the male-leaning training words land on 50% and the female-leaning ones stay at 80%;
    # at scale 2 the other way round: the best rule takes 1 below the goal and 2 above it
    at_1 = _measured({o: 0.5 if o in male_leaning else 0.8 for o in TRAIN_OCCUPATIONS}, dict.fromkeys(TEST_OCCUPATIONS, 0.1))
    at_2 = _measured({o: 0.9 if o in male_leaning else 0.5 for o in TRAIN_OCCUPATIONS}, dict.fromkeys(TEST_OCCUPATIONS, 0.5))
    fit = two_sided_fit({1.0: at_1, 2.0: at_2})
    assert (fit["below_goal_scale"], fit["above_goal_scale"]) == (1.0, 2.0)
    assert fit["training_bias"] == 0.0
    held = {o: 0.1 if OCCUPATION_BY_NAME[o].p_female < 0.5 else 0.5 for o in TEST_OCCUPATIONS}
    assert fit["held_out_female_share"] == held
    assert fit["held_out_max_bias"] == 0.8 and fit["held_out_bias"] == 0.4  # two of the four at 10% female


def test_on_the_neutral_looks_model_the_exact_text_rule_debiases_the_held_out_occupations():
    """The premise of the neutral-looks variant, on its committed weights: the stereotype is on the shared
    directions only, so moving each word's row by its gender coordinate, with no training, brings the
    held-out occupations near 50% female; a finetune that learns that rule from its prompts can reach them."""
    from adaptors.generation import configure_threads, load_pipeline
    from benchmarks.shared_axis_ceiling import measure
    from testbed.shared_axis import NEUTRAL_LOOK_OCCUPATIONS

    configure_threads(1)
    pipe = load_pipeline("testbed-neutral-looks", device="cpu")
    base = measure(pipe, "gender", 0.0, per_seed=8, train_images=2, words=NEUTRAL_LOOK_OCCUPATIONS)
    rule = measure(pipe, "gender", 1.0, per_seed=8, train_images=2, words=NEUTRAL_LOOK_OCCUPATIONS)
    # 32 images per occupation: the base model gives each held-out occupation <= 3% or >= 97% female
    assert base["held_out_bias"]["gender"] > 0.8
    assert all(share < 0.1 or share > 0.9 for share in base["held_out_female_share"].values())
    assert rule["held_out_bias"]["gender"] < 0.35
    assert all(0.2 < share < 0.8 for share in rule["held_out_female_share"].values())


def test_the_regression_read_of_the_true_shares_moves_the_held_out_words_close_to_the_rule():
    """`--read regressed`: the regression start's fit on the training words' true shares (perfect leans, no
    images) moves each held-out word along the gender axis by 0.85 to 1.1 of its own coordinate (measured:
    1.00, 1.08, 0.86, 0.98), and every word against its lean; the leans measured from 32 images at guidance 5
    gave 0.75 to 0.86 on seed 0."""
    from adaptors.generation import configure_threads, load_pipeline
    from benchmarks.fairness_dft import gender_readout, held_out_rows
    from benchmarks.shared_axis_ceiling import regressed_gender_move
    from testbed.shared_axis import NEUTRAL_LOOK_OCCUPATIONS

    configure_threads(1)
    pipe = load_pipeline("testbed-neutral-looks", device="cpu")
    readout, coordinate = gender_readout(pipe, "testbed-neutral-looks")
    moves = regressed_gender_move(pipe, held_out_rows(pipe), NEUTRAL_LOOK_OCCUPATIONS) @ readout
    shares = [m / -coordinate[o] for m, o in zip(moves, TEST_OCCUPATIONS, strict=True)]
    assert all(0.85 < s < 1.1 for s in shares), shares


def test_spread_reads_the_rule_on_fresh_seed_sets_and_puts_the_rows_back():
    """`--spread`: each set of evaluation seeds is new (none of fairness_dft's), the rule is read on every set
    (the base model fails the gender target on each, the exact rule moves every set far from it), and the
    token table is the committed one afterwards."""
    import torch

    from adaptors.generation import configure_threads, load_pipeline
    from benchmarks.fairness_dft import SEEDS
    from benchmarks.shared_axis_ceiling import spread
    from testbed.shared_axis import NEUTRAL_LOOK_OCCUPATIONS

    configure_threads(1)
    pipe = load_pipeline("testbed-neutral-looks", device="cpu")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    base = spread(pipe, 0.0, per_seed=4, sets=2, words=NEUTRAL_LOOK_OCCUPATIONS, read="exact")
    rule = spread(pipe, 1.0, per_seed=4, sets=2, words=NEUTRAL_LOOK_OCCUPATIONS, read="exact")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    seeds = [s for f in base["per_seed_set"] for s in f["seeds"]]
    assert len(set(seeds)) == 8 and not set(seeds) & set(SEEDS)
    assert base["target_met"] == "0 of 2" and base["bias_mean"] > 0.8
    assert rule["bias_mean"] < base["bias_mean"] - 0.3
