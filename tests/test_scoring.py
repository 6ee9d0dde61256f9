"""Scoring held-out predictions: figures with intervals, paired comparisons, probe labels, example rows."""

import numpy as np
import pytest

from evaluation import metrics as M
from evaluation.scoring import comparisons, embedding_metrics, frechet_summaries, spread_rows, word_labels


def _models(n: int = 60, d: int = 6):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((n, d))
    text = image + rng.standard_normal((n, d))
    prior = np.stack([image + 0.3 * rng.standard_normal((n, d)) for _ in range(3)])  # 3 noise seeds
    return {"prior": prior, "TextEmb": text[None]}, image, text


def test_embedding_metrics_average_seeds_and_bootstrap_rows():
    models, image, text = _models()
    summaries, rows = embedding_metrics(models, image, text, n_boot=100, level=0.9, boot_seed=0, n_boot_fd=30)
    cos = np.stack([M.rowwise_cosine(p, image) for p in models["prior"]])
    assert np.allclose(rows["prior"]["cos_image"], cos)
    s = summaries["prior"]["cos_image"]
    assert s["value"] == pytest.approx(cos.mean()) and s["seed_values"] == pytest.approx(list(cos.mean(1)))
    assert s["ci"] == pytest.approx(list(M.bootstrap_ci(cos.mean(0), 100, 0.9, 0)))
    rank = summaries["TextEmb"]["rank"]
    assert rank["statistic"] == "median" and rank["value"] == np.median(M.retrieval_ranks(text, image))
    assert summaries["TextEmb"]["cos_image"]["seeds"] == 1  # a deterministic baseline
    fd = summaries["prior"]["frechet"]
    assert fd["value"] == pytest.approx(np.mean([M.frechet_distance(p, image) for p in models["prior"]]))
    assert fd["ci_method"] == "normal" and fd["bootstrap_draws"] == 30  # < 100 draws: normal interval


def test_frechet_draws_resample_both_sides_together():
    models, image, _ = _models()
    fd = frechet_summaries({"TextEmb": models["TextEmb"]}, image, 0.9, boot_seed=4, n_boot=120)["TextEmb"]
    draws = [M.frechet_distance(models["TextEmb"][0][i], image[i]) for i in M.bootstrap_indices(60, 120, 4)]
    assert fd["ci_method"] == "percentile"
    assert fd["ci"] == pytest.approx([np.quantile(draws, 0.05), np.quantile(draws, 0.95)])


def test_comparisons_pair_each_prior_with_every_other_model_once():
    models, image, text = _models()
    models["prior2"] = models["prior"][::-1] + 0.1
    _, rows = embedding_metrics(models, image, text, 50, 0.95, 0, 10)
    out = comparisons(rows, ["prior", "prior2"], n_boot=50, level=0.95, boot_seed=0, metrics=("cos_image",))
    assert [(c["a"], c["b"]) for c in out] == [("prior", "TextEmb"), ("prior", "prior2"), ("prior2", "TextEmb")]
    first = out[0]
    diff = rows["prior"]["cos_image"].mean(0) - rows["TextEmb"]["cos_image"][0]
    assert first["value"] == pytest.approx(diff.mean()) and first["metric"] == "cos_image"


def test_word_labels_match_whole_words_in_any_case():
    labels = word_labels(["A Red-car", "a redder box", "blue and RED"], ["red", "blue"])
    assert labels.tolist() == [[True, False], [False, False], [True, True]]
    assert word_labels([], ["red"]).shape == (0, 1)


def test_spread_rows():
    assert spread_rows(10, 3) == [0, 4, 9]
    assert spread_rows(2, 5) == [0, 1]
