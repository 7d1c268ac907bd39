"""fairness_dft's training figures read the training iterations alone, whatever else a trainer reports."""


def test_the_curve_skips_a_measured_starts_measuring_points_and_counts_skipped_steps():
    from benchmarks.fairness_dft import training_curve

    measuring = [{"phase": "measuring base images", "step": j, "total": 3, "prompt": "p"} for j in (1, 2, 3)]
    iterations = [{"iteration": i, "step": i, "total": 4, "loss": 1.0 / i, "align": 0.5, "preserve": 0.1,
                   "grad_norm": None if i == 3 else float(i), "skipped": i == 3} for i in (1, 2, 3, 4)]  # fmt: skip
    figures = training_curve(measuring + iterations)
    assert [p["iteration"] for p in figures["loss_curve"]] == [1, 2, 3, 4]
    assert figures["grad_norm_median"] == 2.0 and figures["skipped_steps"] == 1
    assert training_curve(measuring) == {"loss_curve": [], "grad_norm_median": None, "skipped_steps": 0}
