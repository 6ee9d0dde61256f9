"""Embedding metrics on hand-built embeddings with known answers."""

import math

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


def _resampled(stat, values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval computed by hand: seeded draws of row indices, quantiles of the statistic."""
    draws = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    s = np.array([stat(values[i]) for i in draws])
    return float(np.quantile(s, (1 - level) / 2)), float(np.quantile(s, (1 + level) / 2))


def test_bootstrap_ci_equals_a_hand_computed_percentile_interval():
    v = np.random.default_rng(4).standard_normal(60) ** 2
    assert M.bootstrap_ci(v, 400, 0.9, seed=5) == pytest.approx(_resampled(np.mean, v, 400, 5, 0.9), rel=1e-12)
    assert M.bootstrap_ci(v, 400, seed=5, statistic="median") == pytest.approx(
        _resampled(np.median, v, 400, 5), rel=1e-12)
    with_nan = np.concatenate([v, [np.nan]])  # NaN rows are dropped, not resampled
    assert M.bootstrap_ci(with_nan, 400, seed=5) == M.bootstrap_ci(v, 400, seed=5)
    assert M.bootstrap_ci([3.0], 400) == (3.0, 3.0)
    assert all(np.isnan(M.bootstrap_ci(v, 0)))


def test_paired_difference_resamples_rows_together():
    rng = np.random.default_rng(2)
    shared = 3.0 * rng.standard_normal(200)  # a row effect both models see
    a, b = shared + rng.standard_normal(200) + 0.2, shared + rng.standard_normal(200)
    diff = M.paired_difference(a, b, n_boot=300, seed=1)
    assert diff.value == pytest.approx((a - b).mean())
    assert diff.ci == pytest.approx(_resampled(np.mean, a - b, 300, 1), rel=1e-12)
    # unpaired (independent row draws for a and b), the shared row effect would widen it about sqrt(10) times
    draws = [np.random.default_rng(s).integers(0, 200, size=(300, 200)) for s in (1, 2)]
    unpaired = a[draws[0]].mean(axis=1) - b[draws[1]].mean(axis=1)
    assert 2 * (diff.ci[1] - diff.ci[0]) < np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025)


def test_set_interval_percentile_or_normal_by_draw_count():
    draws = np.random.default_rng(0).standard_normal(150)
    ci, method = M.set_interval(draws, 0.0, 0.9)
    assert method == "percentile" and ci == (np.quantile(draws, 0.05), np.quantile(draws, 0.95))
    ci, method = M.set_interval(draws[:20], 1.0, 0.95)
    half = 1.959963984540054 * draws[:20].std(ddof=1)
    assert method == "normal" and ci == pytest.approx((1.0 - half, 1.0 + half))
    assert M.set_interval(np.array([np.nan, 1.0]), 1.0, 0.95)[1] == "none"  # one finite draw
    s = M.set_summary([1.0, 3.0], draws, 40, 0.9)
    assert s["value"] == 2.0 and s["seed_values"] == [1.0, 3.0] and s["bootstrap_draws"] == 150


def test_t_interval_matches_a_hand_computation():
    # Student's t quantiles from a table: t(0.975; 2) = 4.3027, t(0.975; 11) = 2.2010, t(0.95; 2) = 2.9200
    lo, hi = M.t_interval([0.1, 0.2, 0.3])
    half = 4.3027 * 0.1 / math.sqrt(3)
    assert lo == pytest.approx(0.2 - half, rel=1e-4) and hi == pytest.approx(0.2 + half, rel=1e-4)
    twelve = [0.0, 1.0] * 6  # mean 0.5, sd sqrt(12 / 44)
    lo, hi = M.t_interval(twelve)
    assert hi - 0.5 == pytest.approx(2.2010 * math.sqrt(12 / 44) / math.sqrt(12), rel=1e-4)
    lo, hi = M.t_interval([0.1, 0.2, 0.3], level=0.9)
    assert hi - 0.2 == pytest.approx(2.9200 * 0.1 / math.sqrt(3), rel=1e-4)
    assert M.t_interval([0.5]) is None
    assert M.t_interval([0.3, 0.3]) == [0.3, 0.3]  # seeds that agree: the point, not scipy's NaN


def test_over_seeds_leaves_out_seeds_without_a_value():
    s = M.over_seeds([0.1, None, 0.3])
    assert (s["mean"], s["n"], s["seeds"]) == (pytest.approx(0.2), 2, [0.1, None, 0.3])
    assert s["ci"] == pytest.approx(M.t_interval([0.1, 0.3]))
    assert M.over_seeds([None]) == {"mean": None, "ci": None, "n": 0, "seeds": [None]}


def test_t_interval_uses_students_quantiles():
    assert M.t_interval([1.0]) is None
    lo, hi = M.t_interval([1.0, 3.0])  # df 1: t_0.975 = 12.706, sd 1.414, sem 1
    assert (lo, hi) == pytest.approx((2.0 - 12.7062, 2.0 + 12.7062), abs=1e-4)
    v = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]  # df 11: t_0.975 = 2.201
    half = 2.20099 * np.std(v, ddof=1) / np.sqrt(len(v))
    assert M.t_interval(v) == pytest.approx((5.5 - half, 5.5 + half), abs=1e-4)


def _auc_by_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over every (positive, negative) pair."""
    pos, neg = scores[labels], scores[~labels]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(15, 3)).astype(float)  # few values: many ties
    labels = rng.random((15, 3)) < 0.4
    labels[0], labels[1] = True, False  # both classes in every column
    assert M.auc_per_column(scores, labels) == pytest.approx(
        [_auc_by_pairs(scores[:, k], labels[:, k]) for k in range(3)], abs=1e-12)
    assert M.mean_auc(scores, labels) == pytest.approx(np.mean(M.auc_per_column(scores, labels)))


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


def test_a_difference_is_claimed_only_where_its_interval_excludes_zero():
    assert M.verdict([0.01, 0.2]) == "a > b" and M.verdict([-0.3, -0.02]) == "a < b"
    assert M.verdict([-0.01, 0.2]) == "no clear difference" and M.verdict(None) == "no interval"
    assert M.verdict([0.0001, 0.0003], min_effect=0.01) == "negligible (< 0.01)"  # excludes 0, but says nothing
    assert M.verdict([0.004, 0.03], min_effect=0.01) == "negligible (< 0.01)"  # could be as small as 0.004
    assert M.verdict([-0.05, -0.02], min_effect=0.01) == "a < b" and M.verdict([0.02, 0.05], 0.01) == "a > b"
