"""Embedding metrics on hand-built embeddings with known answers."""

import numpy as np
import pytest
from scipy import linalg

from evaluation import metrics as M


def _data(n: int = 300, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, d))
    text = image @ rng.standard_normal((d, d)) / np.sqrt(d) + 0.1 * rng.standard_normal((n, d))
    return image, text


def test_perfect_predictor_scores_perfectly():
    image, text = _data()
    rows = M.row_metrics(image.copy(), image, text)
    assert np.allclose(rows["cos_image"], 1.0)
    assert rows["r1"].mean() == 1.0 and rows["r5"].mean() == 1.0
    assert np.all(rows["rank"] == 1)
    assert np.allclose(rows["norm_ratio"], 1.0) and np.allclose(rows["mse"], 0.0)
    assert M.frechet_distance(image, image) == pytest.approx(0.0, abs=1e-8)
    # LAION's "difference from baseline": cos(pred, image) - cos(text, image)
    assert np.allclose(rows["cos_image_minus_baseline"], 1.0 - M.rowwise_cosine(text, image))


def test_shuffled_predictor_is_at_chance():
    n = 400
    image, text = _data(n)
    perm = np.random.default_rng(1).permutation(n)
    ranks = M.retrieval_ranks(image[perm], image)
    fixed_points = int((perm == np.arange(n)).sum())
    # Each prediction is another row's image: only fixed points of the permutation are found.
    assert M.recall_at_k(ranks, 1).mean() == fixed_points / n
    assert abs(ranks.mean() - (n + 1) / 2) < 30  # uniform ranks: mean (n+1)/2, s.e. ~ n/sqrt(12 n) ~ 6
    assert abs(M.recall_at_k(ranks, 40).mean() - 0.1) < 0.06
    # The Fréchet distance cannot see a shuffle (same set), cosine to the own image can.
    assert M.frechet_distance(image[perm], image) == pytest.approx(0.0, abs=1e-8)
    assert abs(M.rowwise_cosine(image[perm], image).mean()) < 0.05


def test_retrieval_is_blind_to_a_constant_shift_but_cosine_is_not():
    """The prototype's lesson: R@1 ranks cosines, so a constant gap orthogonal to the images (as CLIP's
    modality gap nearly is) leaves it perfect, while cos to the true image and the Fréchet distance see it."""
    image, _ = _data(200, 32)
    image[:, -1] = 0.0  # images live in a subspace ...
    gap = np.zeros(32)
    gap[-1] = 10.0  # ... and the gap is orthogonal to it
    shifted = image + gap
    assert M.recall_at_k(M.retrieval_ranks(shifted, image), 1).mean() == 1.0
    assert M.rowwise_cosine(shifted, image).mean() < 0.6
    assert M.frechet_distance(shifted, image) == pytest.approx(100.0, rel=1e-9)


def test_ranks_with_targets_ties_and_duplicates():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    # explicit targets: query 0 wants item 1
    assert M.retrieval_ranks(np.array([[0.0, 1.0]]), gallery, np.array([1]))[0] == 1
    # an exact duplicate of the target (same image stored twice) does not count against the query
    assert M.retrieval_ranks(np.array([[1.0, 0.1]]), gallery, np.array([0]))[0] == 1
    # a degenerate prediction (every similarity equal) ranks last, not first
    assert M.retrieval_ranks(np.zeros((1, 2)), gallery, np.array([1]))[0] == 4
    ranks = M.retrieval_ranks(*_data(50)[::-1])
    assert np.all(np.diff([M.recall_at_k(ranks, k).mean() for k in (1, 5, 10, 50)]) >= 0)
    assert M.recall_at_k(ranks, 50).mean() == 1.0


def test_frechet_distance_matches_the_scipy_formula():
    rng = np.random.default_rng(3)
    for n, d in ((200, 8), (12, 20)):  # also fewer rows than dimensions (rank-deficient covariances)
        x = rng.standard_normal((n, d))
        y = 1.3 * rng.standard_normal((n, d)) + 0.4
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(
            linalg.sqrtm(s1 @ s2)).real
        assert M.frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError):
        M.frechet_distance(x[:1], y)


def test_bootstrap_intervals_shrink_with_more_samples_and_are_seeded():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 500, 5000):
        v = rng.standard_normal(n)
        lo, hi = M.bootstrap_ci(v, n_boot=500, seed=0)
        assert lo < v.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 5  # ~ sqrt(100) = 10
    v = rng.standard_normal(100)
    assert M.bootstrap_ci(v, seed=7) == M.bootstrap_ci(v, seed=7)
    assert M.bootstrap_ci(v, seed=7) != M.bootstrap_ci(v, seed=8)


def test_summarize_averages_seeds_then_bootstraps_rows():
    rng = np.random.default_rng(0)
    per_seed = rng.standard_normal((3, 400)) + np.array([[0.0], [0.1], [0.2]])
    s = M.summarize(per_seed, n_boot=300, seed=0)
    assert s.value == pytest.approx(per_seed.mean())
    assert s.seed_values == pytest.approx(list(per_seed.mean(axis=1)))
    assert s.ci[0] < s.value < s.ci[1] and s.n == 400
    d = s.to_dict()
    assert d["seeds"] == 3 and len(d["ci"]) == 2
    med = M.summarize(np.array([1.0, 2.0, 100.0]), statistic="median")
    assert med.value == 2.0
    diff = M.paired_difference(per_seed + 0.5, per_seed, n_boot=200)
    assert diff.value == pytest.approx(0.5) and diff.ci[0] == pytest.approx(0.5) and diff.ci[1] == pytest.approx(0.5)


def test_ridge_from_streamed_moments_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.standard_normal((d, d))
    x = rng.standard_normal((3000, d))
    y = x @ a + 2.0 + 0.01 * rng.standard_normal((3000, d))
    fit, val = M.Moments(d, d), M.Moments(d, d)
    for s in range(0, 2700, 500):  # streamed in chunks, 9 rows in 10 to fit
        fit.add(x[s : min(s + 500, 2700)], y[s : min(s + 500, 2700)])
    val.add(x[2700:], y[2700:])
    ridge = M.fit_ridge(fit, val)
    assert ridge.alpha == min(M.RIDGE_ALPHAS)  # nearly noise-free: the smallest penalty wins
    x_new = rng.standard_normal((100, d))
    assert M.rowwise_cosine(ridge.predict(x_new), x_new @ a + 2.0).min() > 0.999
    # the moment formula for the validation error equals the direct computation
    w = M._ridge_weight(fit, 0.1)
    direct = (((x[2700:] - fit.mean_x) @ w + fit.mean_y - y[2700:]) ** 2).sum()
    assert M._validation_sse(fit, val, w) == pytest.approx(direct, rel=1e-6)


def test_text_shift_moves_text_onto_the_image_mean():
    rng = np.random.default_rng(0)
    text = rng.standard_normal((500, 8)) + 5.0
    image = rng.standard_normal((500, 8)) - 5.0
    shifted = M.text_shift(text, text.mean(0), image.mean(0))
    assert np.allclose(shifted.mean(0), image.mean(0))
    assert M.rowwise_cosine(shifted, image).mean() > M.rowwise_cosine(text, image).mean()


def test_unrelated_caption_norm_ratio_and_nearest():
    rng = np.random.default_rng(0)
    text = rng.standard_normal((6, 4))
    assert np.allclose(M.unrelated_cosine(text, text), M.rowwise_cosine(text, np.roll(text, -1, axis=0)))
    assert not np.any(np.isclose(M.unrelated_cosine(text, text), 1.0))
    assert np.allclose(M.norm_ratio(2 * text, text), 2.0)
    idx, cos = M.nearest_neighbours(text[:2], text, 3)
    assert idx.shape == (2, 3) and list(idx[:, 0]) == [0, 1] and np.allclose(cos[:, 0], 1.0)
    assert np.allclose(M.max_cosine(text, text), 1.0)


def test_auc_and_probe():
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    scores = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    auc = M.auc_per_column(scores, labels)
    assert auc[0] == 1.0 and auc[1] == 0.5  # perfect; all tied -> 0.5
    assert M.auc_per_column(-scores, labels)[0] == 0.0
    assert np.isnan(M.auc_per_column(scores, np.ones((4, 2), bool))).all()
    # A probe trained on "image embeddings" recovers attributes that live in a direction of them.
    rng = np.random.default_rng(0)
    attr = rng.integers(0, 2, size=(600, 2)).astype(bool)
    x = rng.standard_normal((600, 12)) + 2.0 * attr[:, :1] - 2.0 * attr[:, 1:2] * np.eye(12)[3]
    probe = M.fit_probe(x[:400], attr[:400], ["red", "blue"])
    assert M.mean_auc(probe.scores(x[400:]), attr[400:]) > 0.9
    # ... and a prediction shifted off the manifold (a constant gap) loses it
    assert M.mean_auc(probe.scores(x[400:] * 0 + x.mean(0)), attr[400:]) == 0.5
