"""FID, KID and IS against closed forms; streaming statistics against one-shot numpy."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from diffusevae.core import metrics as M


def _stats(x: np.ndarray, batch: int = 37, max_kept: int = 10_000) -> M.Stats:
    acc = M.StatsAccumulator(max_kept=max_kept)
    for i in range(0, len(x), batch):
        acc.update(x[i:i + batch])
    return acc.result()


# ---- streaming statistics ------------------------------------------------------------------

def test_streaming_stats_equal_one_shot_numpy():
    rng = np.random.default_rng(0)
    # a large common offset: naive sums of squares would lose digits, the shifted sums do not
    x = 1e4 + rng.standard_normal((1000, 6)) @ rng.standard_normal((6, 6))
    s = _stats(x.astype(np.float32), batch=37)
    x = x.astype(np.float32).astype(np.float64)
    assert s.n == 1000
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert np.array_equal(s.sigma, s.sigma.T)
    # uneven batches and one big batch give the same numbers
    s1 = _stats(x, batch=1000)
    np.testing.assert_allclose(s.sigma, s1.sigma, rtol=1e-9, atol=1e-9)


def test_reservoir_keeps_everything_when_it_fits_and_is_uniform_otherwise():
    x = np.arange(50, dtype=np.float64)[:, None] * np.ones((1, 2))
    assert np.array_equal(_stats(x, batch=7).features[:, 0], np.arange(50))
    counts = np.zeros(100)
    for seed in range(2000):
        acc = M.StatsAccumulator(max_kept=10, seed=seed)
        for i in range(0, 100, 13):
            acc.update(np.arange(i, min(100, i + 13), dtype=np.float64)[:, None] * [1, 1])
        kept = acc.result().features[:, 0].astype(int)
        assert len(set(kept)) == 10
        counts[kept] += 1
    freq = counts / 2000  # each of the 100 rows kept with probability 10/100
    assert abs(freq.mean() - 0.1) < 1e-12 and np.abs(freq - 0.1).max() < 0.035
    assert abs(freq[:10].mean() - freq[90:].mean()) < 0.02  # early rows are not favoured


def test_stats_reject_bad_input():
    acc = M.StatsAccumulator()
    with pytest.raises(M.MetricError, match="at least 2"):
        acc.result()
    acc.update(np.zeros((3, 4)))
    with pytest.raises(M.MetricError, match="width"):
        acc.update(np.zeros((3, 5)))
    with pytest.raises(M.MetricError, match="non-finite"):
        acc.update(np.full((2, 4), np.nan))


# ---- FID -----------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.exponential(size=(600, 20)) @ rng.standard_normal((20, 20))  # not Gaussian
    s = _stats(x)
    assert abs(M.fid(s, s)) < 1e-8
    # a shift changes only the mean term: ||0.1 * 1||^2 = 20 * 0.01
    assert M.fid(s, _stats(x + 0.1)) == pytest.approx(0.2, rel=1e-6)


def test_fid_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2 for commuting diagonal matrices
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_matches_closed_form_for_non_commuting_2x2():
    # For 2x2 M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.3], [0.3, 0.5]])
    r = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    s2 = r @ np.diag([1.5, 0.2]) @ r.T
    m = s1 @ s2
    assert not np.allclose(m, m.T)  # they do not commute
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = 0.25 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = M.frechet_distance([0.0, 0.5], s1, [0.0, 0.0], s2)
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_guards_singular_covariances_and_rejects_large_imaginary_parts():
    rng = np.random.default_rng(3)
    few = _stats(rng.standard_normal((10, 32)))  # rank 9 < 32: singular covariance
    assert np.linalg.matrix_rank(few.sigma) < 32
    value = M.fid(few, _stats(rng.standard_normal((12, 32))))
    assert np.isfinite(value) and value > 0
    assert abs(M.fid(few, few)) < 1e-7  # eps in every term (2 d eps = 6e-5 otherwise)
    dead = np.eye(3)[[0, 1, 0, 1, 1, 0, 0, 1]] * [1.0, 2.0, 0.0]  # a unit that never fires
    singular = _stats(dead)
    assert abs(M.frechet_distance(singular.mu, singular.sigma, singular.mu,
                                  singular.sigma)) < 1e-9
    # not a covariance (a negative eigenvalue): its square root is far from real
    with pytest.raises(M.MetricError, match="imaginary"):
        M.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(M.MetricError, match="same"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_fid_of_sampled_gaussians_converges_to_the_closed_form():
    rng = np.random.default_rng(4)
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0])
    x = rng.standard_normal((200_000, 3)) * np.sqrt(a)
    y = rng.standard_normal((200_000, 3)) * np.sqrt(b) + 1.0
    expected = 3.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.fid(_stats(x, 5000), _stats(y, 5000)) == pytest.approx(expected, rel=0.02)


def test_scipy_sqrtm_is_what_the_trace_uses():
    s = np.array([[2.0, 0.5], [0.5, 1.0]])
    trace, eps = M._sqrtm_trace(s, s)
    assert trace == pytest.approx(np.trace(scipy.linalg.sqrtm(s @ s)).real) and eps == 0
    assert M._sqrtm_trace(s, s, regularize=True)[1] == M.SQRTM_EPS


# ---- KID -----------------------------------------------------------------------------------

def test_kid_is_unbiased_for_the_same_distribution():
    rng = np.random.default_rng(5)
    values, biased = [], []
    for _ in range(300):
        x, y = rng.standard_normal((40, 4)), rng.standard_normal((40, 4))
        values.append(M.mmd2_unbiased(x, y))
        kxx, kyy, kxy = (M.polynomial_kernel(x, x), M.polynomial_kernel(y, y),
                         M.polynomial_kernel(x, y))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())  # keeps the diagonals
    se = np.std(values) / np.sqrt(len(values))
    assert abs(np.mean(values)) < 3 * se
    assert np.mean(biased) > 10 * se  # the V-statistic is biased upwards: the test can fail


def _poly_moment(a: float, b: float) -> float:
    """E (xy + 1)^3 for independent x ~ N(a, 1), y ~ N(b, 1) (d = 1)."""
    m1 = lambda m: m  # noqa: E731  E x
    m2 = lambda m: 1 + m**2  # noqa: E731  E x^2
    m3 = lambda m: m**3 + 3 * m  # noqa: E731  E x^3
    return m3(a) * m3(b) + 3 * m2(a) * m2(b) + 3 * m1(a) * m1(b) + 1


def test_kid_of_shifted_gaussians_matches_its_expectation():
    a, b = 0.0, 0.5
    expected = _poly_moment(a, a) + _poly_moment(b, b) - 2 * _poly_moment(a, b)  # 3.578125
    rng = np.random.default_rng(6)
    values = [M.mmd2_unbiased(rng.normal(a, 1, (200, 1)), rng.normal(b, 1, (200, 1)))
              for _ in range(400)]
    se = np.std(values) / np.sqrt(len(values))
    assert expected == pytest.approx(3.578125)
    assert abs(np.mean(values) - expected) < 3.5 * se


def test_kid_subsets():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((300, 5)), rng.standard_normal((300, 5)) + 1
    mean, std = M.kid(x, y, subsets=20, subset_size=100)
    assert mean > 0 and std > 0
    mean_all, std_all = M.kid(x, y, subsets=20, subset_size=1000)  # whole sets: one subset
    assert mean_all == pytest.approx(M.mmd2_unbiased(x, y)) and std_all == 0
    with pytest.raises(M.MetricError):
        M.kid(x[:1], y)


# ---- IS ------------------------------------------------------------------------------------

def test_inception_score_of_confident_predictions_is_exp_label_entropy():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 10, 1000)
    logits = 60.0 * np.eye(10)[labels]  # p(y|x) one-hot: KL = -log p(y)
    acc = M.ISAccumulator(splits=4)
    for i in range(0, 1000, 64):
        acc.update(logits[i:i + 64])
    expected = []
    for s in range(4):
        hist = np.bincount(labels[s::4], minlength=10) / len(labels[s::4])
        expected.append(np.exp(-np.sum(hist[hist > 0] * np.log(hist[hist > 0]))))
    mean, std = acc.result()
    assert mean == pytest.approx(np.mean(expected), rel=1e-9)
    assert std == pytest.approx(np.std(expected), rel=1e-6)
    assert 9 < mean <= 10


def test_inception_score_is_one_when_every_image_gets_the_same_prediction():
    acc = M.ISAccumulator(splits=2)
    acc.update(np.tile([[2.0, 0.5, -1.0]], (50, 1)))
    assert acc.result()[0] == pytest.approx(1.0)
    few = M.ISAccumulator(splits=10)
    few.update(np.zeros((3, 3)))
    with pytest.raises(M.MetricError, match="at least 10"):
        few.result()


# ---- cached statistics ---------------------------------------------------------------------

def test_stats_cache_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    s = _stats(rng.standard_normal((30, 4)), max_kept=20)
    s.meta = {"extractor": {"weights_sha256": "ab" * 32}, "dataset": "digits"}
    key = M.stats_key("fashion-mnist", "test", 28, "classifier", "ab" * 32, "1ch-x")
    assert key == "fashion-mnist-test-28px-classifier-abababababab-1ch-x"
    path = M.stats_path(tmp_path, key)
    M.save_stats(path, s)
    back = M.load_stats(path)
    assert back.n == 30 and back.meta == s.meta and back.features.shape == (20, 4)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(M.MetricError, match="mu"):
        M.load_stats(tmp_path / "bad.npz")


# ---- detection: AUROC and FPR at 95% TPR ----------------------------------------------------

def test_auroc_of_known_cases():
    """Counted by hand: of the 3 x 3 pairs (negative, positive), the positive scores higher in
    6, ties in 1 (counting 1/2) and lower in 2: AUROC 6.5 / 9. Separated sets give 1, reversed
    0, identical sets 1/2; the result is scipy's Mann-Whitney U over n_neg n_pos."""
    neg, pos = [0.1, 0.4, 0.35], [0.8, 0.4, 0.2]
    # pairs (n, p): (0.1: 0.8 0.4 0.2 -> 3 higher), (0.4: 0.8 higher, 0.4 tie, 0.2 lower),
    # (0.35: 0.8 0.4 higher, 0.2 lower)
    assert M.auroc(neg, pos) == pytest.approx(6.5 / 9)
    assert M.auroc([1, 2, 3], [4, 5]) == 1.0 and M.auroc([4, 5], [1, 2, 3]) == 0.0
    assert M.auroc([1, 2, 3], [1, 2, 3]) == 0.5
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(0.7, 1, size=40).round(1)
    u = scipy.stats.mannwhitneyu(b, a).statistic
    assert M.auroc(a, b) == pytest.approx(u / (50 * 40), abs=1e-12)


def test_auroc_standard_error_matches_the_spread():
    """Hanley and McNeil's error against the spread of 400 AUROCs of fresh normal samples."""
    rng = np.random.default_rng(2)
    values = [M.auroc(rng.normal(size=60), rng.normal(1.0, 1, size=40)) for _ in range(400)]
    se = M.auroc_standard_error(float(np.mean(values)), 60, 40)
    assert 0.8 * np.std(values) < se < 1.25 * np.std(values)
    assert M.auroc_standard_error(1.0, 10, 10) == 0.0


def test_fpr_at_95_tpr_of_known_cases():
    """20 positives 1..20: the threshold that flags 95% of them (19) is 2, so the negatives at
    or above 2 count; 10 positives: ceil(9.5) = 10 must be flagged, threshold 1."""
    pos = np.arange(1, 21)
    assert M.fpr_at_tpr([0, 1, 1.5, 2, 3], pos) == pytest.approx(2 / 5)
    assert M.fpr_at_tpr([0, 1, 1.5, 2, 3], np.arange(1, 11)) == pytest.approx(4 / 5)
    assert M.fpr_at_tpr([-5, -4], pos) == 0.0 and M.fpr_at_tpr([30, 40], pos) == 1.0
    with pytest.raises(M.MetricError, match="finite"):
        M.auroc([0.0, float("nan")], [1.0])
    with pytest.raises(M.MetricError, match="non-empty"):
        M.fpr_at_tpr([], [1.0])
    with pytest.raises(M.MetricError, match="tpr must lie"):
        M.fpr_at_tpr([0.0], [1.0], tpr=0)


def test_fid_interval_covers_the_fid_of_samples_drawn_again():
    """The interval of one sample set is meant to say where the FID of another set of as many
    samples falls: over sets drawn from one Gaussian, it holds the median of their FIDs about as
    often as its level says. Without the correction for the repeated rows it almost never did:
    every bootstrap FID sat above the FID measured."""
    d, n, trials = 8, 120, 60
    rng = np.random.default_rng(0)
    shift = np.full(d, 0.15)
    ref = M.Stats(np.zeros(d), np.eye(d), 10 ** 6)
    sets = [rng.standard_normal((n, d)) + shift for _ in range(trials)]

    def fid_of(f):
        return M.frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref.mu, ref.sigma)

    median = np.median([fid_of(rng.standard_normal((n, d)) + shift) for _ in range(400)])
    held = [lo <= median <= hi for lo, hi in (M.fid_interval(f, ref, rounds=200, seed=i)
                                             for i, f in enumerate(sets))]
    assert 0.8 <= np.mean(held) <= 1.0, np.mean(held)
    for f in sets[:10]:  # and it holds the FID it was computed around
        lo, hi = M.fid_interval(f, ref, rounds=100)
        assert lo <= fid_of(f) <= hi
