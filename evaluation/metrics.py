"""Embedding-level metrics of a text-to-image prior: pure numpy/scipy functions, no I/O.

Every function takes predictions and references as arrays [N, D] (raw CLIP embeddings,
not L2-normalised) and returns per-row values where the figure is a mean over rows, so
that `summarize` can average over noise seeds and bootstrap a confidence interval over
rows (scipy.stats.bootstrap). Set statistics (Fréchet distance, probe AUC) get their own bootstrap
(`set_interval`).

What the figures can and cannot see (measured on the demo world, BENCHMARKS.md): retrieval ranks
cosines, so it is blind to a constant shift: the text embedding itself retrieves
perfectly while it sits across the modality gap from every real image. Report it next to
the gap-sensitive figures: cosine to the real image embedding, Fréchet distance, norm
ratio and attribute probes trained on real image embeddings only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

# -- basics ------------------------------------------------------------------------------------


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) for every row: [N]."""
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def unrelated_cosine(pred: np.ndarray, text: np.ndarray, shift: int = 1) -> np.ndarray:
    """cos(pred_i, text_{i+shift}): similarity to another row's caption (LAION prior metric).

    A roll is a derangement for 0 < shift < N, so no row is compared with its own caption.
    """
    n = len(text)
    if n < 2:
        return np.full(n, np.nan)
    return rowwise_cosine(pred, np.roll(text, -(shift % n or 1), axis=0))


def norm_ratio(pred: np.ndarray, true: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """|pred_i| / |true_i|: a decoder sees raw embeddings, so their scale matters (ideal 1)."""
    return np.linalg.norm(pred, axis=-1) / np.maximum(np.linalg.norm(true, axis=-1), eps)


def squared_error(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean over dimensions of (pred - true)^2 per row: the projection loss of eq. 3."""
    return np.mean((np.asarray(pred, np.float64) - np.asarray(true, np.float64)) ** 2, axis=-1)


# -- retrieval ---------------------------------------------------------------------------------


def retrieval_ranks(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray | None = None, chunk: int = 1024
) -> np.ndarray:
    """1-based rank of each query's target in the gallery, by cosine similarity.

    targets: index of the right gallery item per query (default: query i -> gallery item i).
    Ties: gallery items identical to the target (the same image stored twice, e.g. COCO's five
    captions per image) do not count against the query; any other item at least as similar does,
    so a degenerate prediction (all similarities equal) ranks last, not first.
    """
    q = l2_normalize(queries)
    g = l2_normalize(gallery)
    targets = np.arange(len(q)) if targets is None else np.asarray(targets)
    if len(targets) != len(q):
        raise ValueError(f"{len(q)} queries but {len(targets)} targets")
    _, group = np.unique(np.asarray(gallery), axis=0, return_inverse=True)  # identical gallery rows share a group
    group = group.reshape(-1)
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):  # bounded memory: chunk x gallery similarities at a time
        sims = q[start : start + chunk] @ g.T
        t = targets[start : start + chunk]
        true = sims[np.arange(len(sims)), t]
        greater = (sims > true[:, None]).sum(axis=1)
        tied_other = ((sims == true[:, None]) & (group[None, :] != group[t][:, None])).sum(axis=1)
        ranks[start : start + chunk] = 1 + greater + tied_other
    return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-query indicator (float) that the target is within the top k."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def nearest_neighbours(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [N, k], cosines [N, k]) of the k gallery items most similar to each query."""
    sims = l2_normalize(queries) @ l2_normalize(gallery).T
    k = min(k, sims.shape[1])
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)


def max_cosine(queries: np.ndarray, gallery: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Cosine of each query to its nearest gallery item: is the prediction on the image manifold?"""
    if len(queries) == 0:
        return np.zeros(0)
    g = l2_normalize(gallery)
    q = l2_normalize(queries)
    return np.concatenate([(q[s : s + chunk] @ g.T).max(axis=1) for s in range(0, len(q), chunk)])


# -- Fréchet distance ----------------------------------------------------------------------------


class FrechetReference:
    """The real side of a Fréchet distance, factorised once so many predictions compare cheaply.

    FD = ||mu_r - mu_p||^2 + tr S_r + tr S_p - 2 tr sqrt(S_r S_p), with tr sqrt(S_r S_p) computed as
    the sum of sqrt-eigenvalues of the symmetric PSD matrix S_r^1/2 S_p S_r^1/2 (same spectrum):
    exact, real-valued, and valid for rank-deficient covariances (fewer rows than dimensions),
    where scipy.linalg.sqrtm of the product returns complex round-off.
    """

    def __init__(self, real: np.ndarray):
        real = np.asarray(real, dtype=np.float64)
        if len(real) < 2:
            raise ValueError("the Fréchet distance needs at least 2 rows on each side")
        self.mean = real.mean(0)
        cov = np.cov(real, rowvar=False)
        w, v = np.linalg.eigh(cov)
        self.sqrt_cov = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace = float(np.trace(cov))

    def distance(self, pred: np.ndarray) -> float:
        pred = np.asarray(pred, dtype=np.float64)
        if len(pred) < 2:
            raise ValueError("the Fréchet distance needs at least 2 rows on each side")
        cov = np.cov(pred, rowvar=False)
        mean_term = float(((self.mean - pred.mean(0)) ** 2).sum())
        m = self.sqrt_cov @ cov @ self.sqrt_cov
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
        return max(0.0, mean_term + self.trace + float(np.trace(cov)) - 2.0 * tr_sqrt)


def frechet_distance(pred: np.ndarray, real: np.ndarray) -> float:
    """Fréchet distance between two embedding sets (Gaussian fit), as FID does on Inception features.

    Biased upwards for small n (like FID): compare models only at the same n.
    """
    return FrechetReference(real).distance(pred)


# -- confidence intervals --------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] row indices drawn with replacement: the same draws scipy.stats.bootstrap makes with
    rng=default_rng(seed), so a set statistic's draws line up with the row figures' draws."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(
    values: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (or median) of per-row values (NaN rows dropped).

    Seeded: every model's rows are resampled with the same draws, which makes intervals of different
    models comparable (and a difference's interval paired, see `paired_difference`)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 1:
        return (float(v[0]), float(v[0]))
    if len(v) == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    res = stats.bootstrap((v,), np.mean if statistic == "mean" else np.median, n_resamples=n_boot,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def set_interval(draws: np.ndarray, value: float, level: float) -> tuple[tuple[float, float], str]:
    """(interval, method) of a set statistic (Fréchet distance, probe AUC) from its bootstrap draws.

    Hand-written on purpose: its draws come from `bootstrap_indices` shared by every model (the real
    side of a Fréchet distance is factorised once per draw for all of them), which scipy.stats.bootstrap,
    one statistic per call, cannot share. Percentile from >= 100 draws; from fewer, normal with the
    bootstrap standard error (few draws give crude quantiles)."""
    d = np.asarray(draws, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) >= 100:
        a = (1 - level) / 2
        return (float(np.quantile(d, a)), float(np.quantile(d, 1 - a))), "percentile"
    if len(d) >= 2:
        half = float(stats.norm.ppf(0.5 + level / 2)) * float(d.std(ddof=1))
        return (value - half, value + half), "normal"
    return (float("nan"), float("nan")), "none"


def t_interval(values, level: float = 0.95) -> list[float] | None:
    """Student-t interval of the mean of a few values (e.g. training seeds); None below 2 values. Values that
    agree exactly give the point itself (scipy would give NaN)."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) < 2:
        return None
    if a.max() == a.min():
        return [float(a[0]), float(a[0])]
    lo, hi = stats.t.interval(level, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    return [float(lo), float(hi)]


def over_seeds(values: Sequence[float | None], level: float = 0.95) -> dict:
    """One figure over training seeds: {"mean", "ci" (t_interval), "n", "seeds"}; a seed without a value
    (None) is left out of the mean and the interval."""
    vals = [v for v in values if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None, "ci": t_interval(vals, level), "n": len(vals),
            "seeds": list(values)}


# The smallest paired difference the demo and the grid call an effect: their figures lie in [0, 1] (AUC,
# cosine, R@1), and a gain under 0.01 would change no decoder's image; smaller ones are reported as negligible.
MIN_EFFECT = 0.01


def verdict(ci: Sequence[float] | None, min_effect: float = 0.0) -> str:
    """What a paired interval lets one say: an effect only where it excludes 0, and (with `min_effect`)
    only where the whole interval is at least that far from 0; a smaller one is called negligible."""
    if not ci:
        return "no interval"
    if ci[0] > 0 or ci[1] < 0:
        if min(abs(ci[0]), abs(ci[1])) < min_effect:
            return f"negligible (< {min_effect:g})"
        return "a > b" if ci[0] > 0 else "a < b"
    return "no clear difference"


@dataclass
class Summary:
    """One reported figure: its value, a confidence interval, and how it was obtained."""

    value: float
    ci: tuple[float, float]
    n: int  # rows
    seed_values: list[float] = field(default_factory=list)  # the figure per noise seed (empty: deterministic)
    statistic: str = "mean"

    def to_dict(self) -> dict:
        return {"value": _f(self.value), "ci": [_f(self.ci[0]), _f(self.ci[1])], "n": self.n,
                "seeds": len(self.seed_values) or 1, "seed_values": [_f(v) for v in self.seed_values],
                "statistic": self.statistic}


def _f(v: float) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else v


def set_summary(seed_values: list[float], draws, n: int, level: float) -> dict:
    """A set statistic's summary dict: the mean over noise seeds and `set_interval` of its draws."""
    value = float(np.mean(seed_values))
    draws = np.asarray(draws, dtype=np.float64)
    ci, method = set_interval(draws, value, level)
    out = Summary(value, ci, n, [float(v) for v in seed_values] if len(seed_values) > 1 else []).to_dict()
    return out | {"statistic": "set", "bootstrap_draws": int(np.isfinite(draws).sum()), "ci_method": method}


def summarize(
    per_row: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0, statistic: str = "mean"
) -> Summary:
    """per_row: [N] (deterministic) or [S, N] (S noise seeds). Rows are averaged over seeds first,
    then the interval is bootstrapped over rows (the rows are the sampling unit we care about);
    the per-seed figures are kept so seed spread stays visible."""
    a = np.asarray(per_row, dtype=np.float64)
    seed_values: list[float] = []
    if a.ndim == 2:
        agg = np.mean if statistic == "mean" else np.median
        seed_values = [float(agg(r[~np.isnan(r)])) if np.any(~np.isnan(r)) else float("nan") for r in a]
        a = np.nanmean(a, axis=0) if a.shape[0] > 1 else a[0]
    valid = a[~np.isnan(a)]
    value = (valid.mean() if statistic == "mean" else np.median(valid)) if len(valid) else float("nan")
    return Summary(float(value), bootstrap_ci(valid, n_boot, level, seed, statistic), int(len(valid)),
                   seed_values, statistic)


def paired_difference(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Summary:
    """Mean of a - b over the same rows (seed-averaged first), with a paired bootstrap interval: resampling
    the per-row differences draws the same rows for a and b (scipy's paired=True, same draws)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a.mean(axis=0) if a.ndim == 2 else a
    b = b.mean(axis=0) if b.ndim == 2 else b
    return summarize(a - b, n_boot, level, seed)


# -- the per-row metric set -------------------------------------------------------------------------


ROW_METRICS = ("cos_image", "cos_text", "cos_unrelated_text", "cos_image_minus_baseline", "norm_ratio", "mse",
               "r1", "r5", "r10", "rank")


def row_metrics(pred: np.ndarray, image: np.ndarray, text: np.ndarray, gallery: np.ndarray | None = None) -> dict:
    """Per-row values of every row-level figure for one set of predictions [N, D].

    gallery: image embeddings to retrieve from (default: `image`, the held-out rows themselves;
    row i's target is gallery item i).
    """
    gallery = image if gallery is None else gallery
    cos_image = rowwise_cosine(pred, image)
    ranks = retrieval_ranks(pred, gallery)
    return {
        "cos_image": cos_image,
        "cos_text": rowwise_cosine(pred, text),
        "cos_unrelated_text": unrelated_cosine(pred, text),
        "cos_image_minus_baseline": cos_image - rowwise_cosine(text, image),
        "norm_ratio": norm_ratio(pred, image),
        "mse": squared_error(pred, image),
        "r1": recall_at_k(ranks, 1),
        "r5": recall_at_k(ranks, 5),
        "r10": recall_at_k(ranks, 10),
        "rank": ranks.astype(np.float64),
    }


# -- baselines ----------------------------------------------------------------------------------------


class Moments:
    """Streaming sufficient statistics of paired rows (x, y): n, sums, X'X, X'Y, tr(Y'Y), in float64.

    Enough to fit ridge regression, pick its penalty on a validation part, and give the means for
    the text-shift and mean-image baselines, without keeping the training split in memory.
    """

    def __init__(self, dx: int, dy: int):
        self.n = 0
        self.sx = np.zeros(dx)
        self.sy = np.zeros(dy)
        self.xx = np.zeros((dx, dx))
        self.xy = np.zeros((dx, dy))
        self.yy = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += float((y * y).sum())

    def merged(self, other: Moments) -> Moments:
        m = Moments(len(self.sx), len(self.sy))
        m.n = self.n + other.n
        m.sx, m.sy = self.sx + other.sx, self.sy + other.sy
        m.xx, m.xy, m.yy = self.xx + other.xx, self.xy + other.xy, self.yy + other.yy
        return m

    @property
    def mean_x(self) -> np.ndarray:
        return self.sx / max(self.n, 1)

    @property
    def mean_y(self) -> np.ndarray:
        return self.sy / max(self.n, 1)


@dataclass
class Ridge:
    """y = (x - mean_x) W + mean_y."""

    weight: np.ndarray
    mean_x: np.ndarray
    mean_y: np.ndarray
    alpha: float
    validation_mse: dict[float, float] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean_x) @ self.weight + self.mean_y


def _ridge_weight(m: Moments, alpha: float) -> np.ndarray:
    mx, my = m.mean_x, m.mean_y
    cxx = m.xx - m.n * np.outer(mx, mx)
    cxy = m.xy - m.n * np.outer(mx, my)
    # Penalty relative to the mean eigenvalue of the centred X'X, so alpha is scale-free.
    lam = alpha * max(np.trace(cxx) / len(mx), 1e-12)
    return np.linalg.solve(cxx + lam * np.eye(len(mx)), cxy)


def _validation_sse(fit: Moments, val: Moments, w: np.ndarray) -> float:
    """sum_i ||y_i - ((x_i - mx) W + my)||^2 over the validation rows, from their moments alone."""
    mx, my, n = fit.mean_x, fit.mean_y, val.n
    # A = X - mx, B = Y - my (validation rows centred on the *fit* means)
    ata = val.xx - np.outer(val.sx, mx) - np.outer(mx, val.sx) + n * np.outer(mx, mx)
    atb = val.xy - np.outer(val.sx, my) - np.outer(mx, val.sy) + n * np.outer(mx, my)
    btb = val.yy - 2 * float(val.sy @ my) + n * float(my @ my)
    return float(btb - 2 * np.sum(w * atb) + np.sum(w * (ata @ w)))


RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def fit_ridge(fit: Moments, val: Moments | None = None, alphas=RIDGE_ALPHAS) -> Ridge:
    """Ridge regression text -> image; alpha picked by validation MSE, then refit on fit + val."""
    if fit.n < 2:
        raise ValueError("ridge regression needs at least 2 training rows")
    scores: dict[float, float] = {}
    best = alphas[len(alphas) // 2]
    if val is not None and val.n > 0:
        for a in alphas:
            scores[a] = _validation_sse(fit, val, _ridge_weight(fit, a)) / (val.n * len(fit.sy))
        best = min(scores, key=scores.get)
    full = fit.merged(val) if val is not None and val.n > 0 else fit
    return Ridge(_ridge_weight(full, best), full.mean_x, full.mean_y, best, scores)


def text_shift(text: np.ndarray, mean_text: np.ndarray, mean_image: np.ndarray) -> np.ndarray:
    """text - mean(text) + mean(image): the modality gap is close to a constant vector."""
    return np.asarray(text, dtype=np.float64) - mean_text + mean_image


# -- attribute probes ----------------------------------------------------------------------------------


@dataclass
class Probe:
    """Multi-label logistic regression on standardised real image embeddings."""

    words: list[str]
    weight: np.ndarray  # [D, K]
    bias: np.ndarray  # [K]
    mean: np.ndarray
    std: np.ndarray

    def scores(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std) @ self.weight + self.bias


def fit_probe(x: np.ndarray, labels: np.ndarray, words: list[str], l2: float = 1e-3, steps: int = 200,
              seed: int = 0) -> Probe:
    """Fit one logistic classifier per word on real image embeddings (full-batch L-BFGS, torch).

    Positives are re-weighted to balance each word, so rare attributes are not ignored.
    The affine standardisation is fixed from the real embeddings and applied unchanged to
    predictions: a prediction off the image manifold (gap, wrong norm) is scored as such.
    """
    import torch

    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.from_numpy((x - mean) / std).float()
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    pos = y.sum(0).clamp_min(1)
    pos_weight = (len(y) - pos).clamp_min(1) / pos
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(xs.shape[1], y.shape[1], generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def closure():
        opt.zero_grad()
        loss = loss_fn(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(list(words), w.detach().double().numpy(), b.detach().double().numpy(), mean, std)


def auc_per_column(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each column: Mann-Whitney U / (n_pos n_neg), average ranks for ties; NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = labels.sum(axis=0)
    n_neg = len(labels) - n_pos
    ranks = stats.rankdata(scores, axis=0)  # ties get their average rank
    u = (ranks * labels).sum(axis=0) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def mean_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    aucs = auc_per_column(scores, labels)
    return float(np.nanmean(aucs)) if np.any(~np.isnan(aucs)) else float("nan")
