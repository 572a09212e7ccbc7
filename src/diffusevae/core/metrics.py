"""Sample-quality metrics on features: FID, KID and IS, with streaming statistics in float64;
and detection metrics for anomaly scores.

- `StatsAccumulator` streams features batch by batch: a running sum and a running sum of outer
  products (of features shifted by the first batch's mean, which keeps the float64 sums well
  conditioned), plus a bounded reservoir of features for KID. Its `result()` is a `Stats`.
  Processes that each see a part of the features (rows given with their indices) `combine`
  their accumulators into the one a single process would have built (to float rounding).
- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), with
  a guarded matrix square root.
- `kid`: the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random
  subsets (Binkowski et al. 2018).
- `ISAccumulator`: exp(E_x KL(p(y|x) || p(y))) over splits (Salimans et al. 2016), streamed,
  combined the same way.
- `auroc`, `auroc_standard_error` and `fpr_at_tpr`: how well a score (higher: more likely
  out of distribution) tells two sets of images apart, for the likelihood's anomaly scores.
- Reference statistics are cached as `.npz` files (`save_stats` / `load_stats`), keyed by
  `stats_key` (dataset, split, image size, extractor and its weights' hash).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.stats

from ..errors import MetricError
from ..io.arrays import Want, read_npz
from ..io.reading import parse_checked
from ..io.storage import atomic_write

DEFAULT_CACHE_DIR = Path("~/.cache/diffusevae/stats")
MAX_KEPT = 10_000  # features kept (a uniform reservoir) for KID
KID_SUBSETS = 100  # as torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
SQRTM_EPS = 1e-6  # added to both covariances when their product is singular
MAX_IMAG = 1e-3  # largest imaginary part of the square root's diagonal we drop silently
Reduce = Callable[[np.ndarray], np.ndarray]  # an array -> its elementwise sum or max over parts


# --------------------------------------------------------------------------------------------
# Streaming feature statistics
# --------------------------------------------------------------------------------------------

@dataclass
class Stats:
    """Mean (D,), covariance (D, D) in float64 and count of a feature set; some kept features."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None  # (K, D) a uniform random subset, for KID
    meta: dict = field(default_factory=dict)


class StatsAccumulator:
    """Mean and covariance of features fed in batches, never holding them all (float64).

    Rows have indices 0, 1, 2, ... in the whole feature set. A process that sees only some of
    them passes each batch's first index to `update`; `combine` then gives every process the
    accumulator of all rows.
    """

    def __init__(self, max_kept: int = MAX_KEPT, seed: int = 0):
        if max_kept < 0:
            raise MetricError(f"max_kept must be >= 0; got {max_kept}")
        self.max_kept = max_kept
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n = 0  # rows seen
        self.first: int | None = None  # the index of the first row seen
        self.next = 0  # the index after the last row seen; the reservoir has drawn up to it
        self.shift: np.ndarray | None = None  # (D,) the first batch's mean
        self.sum: np.ndarray | None = None  # (D,) sum of (x - shift)
        self.outer: np.ndarray | None = None  # (D, D) sum of (x - shift)(x - shift)^T
        self.kept: np.ndarray | None = None  # (max_kept, D) reservoir
        self.kept_index = np.full(max_kept, -1, np.int64)  # the row in each slot (-1: none)

    def update(self, feats, start: int | None = None) -> None:
        """Add a batch of features (B, D), a numpy array or a torch tensor.

        ``start``: the index of its first row in the whole set (default: right after the rows
        seen so far). Batches come in ascending order; rows skipped belong to other processes.
        """
        x = np.asarray(feats.detach().cpu() if hasattr(feats, "detach") else feats,
                       dtype=np.float64)
        start = self.next if start is None else start
        if x.ndim != 2:
            raise MetricError(f"features must have shape (B, D); got {x.shape}")
        if start < self.next:
            raise MetricError(f"rows from index {start} after rows up to {self.next - 1}; feed "
                              "batches in ascending order of their rows")
        if self.shift is None:
            d = x.shape[1]
            self.shift, self.first = x.mean(0), start
            self.sum, self.outer = np.zeros(d), np.zeros((d, d))
            self.kept = np.empty((self.max_kept, d), np.float32)
        elif x.shape[1] != len(self.shift):
            raise MetricError(f"features of width {x.shape[1]} after features of width "
                              f"{len(self.shift)}; one extractor per accumulator")
        if not np.isfinite(x).all():
            raise MetricError("non-finite features: the images or the extractor are broken")
        y = x - self.shift
        self.sum += y.sum(0)
        self.outer += y.T @ y
        self._reservoir(x, start)
        self.n += len(x)

    def _reservoir(self, x: np.ndarray, start: int) -> None:
        """Algorithm R (Vitter 1985): after n rows, each is kept with probability K / n.

        Row i >= K draws its slot from the generator, whatever the features are: the draws
        depend on the row indices alone. Rows of other processes (``next..start-1``) are
        drawn for and dropped, so that this row draws what one process seeing all rows would.
        """
        self._draw_until(start)
        for i, row in enumerate(x, start):  # i: the row's index in the whole set
            j = i if i < self.max_kept else int(self.rng.integers(0, i + 1))
            if j < self.max_kept:
                self.kept[j], self.kept_index[j] = row, i
        self.next = start + len(x)

    def _draw_until(self, stop: int) -> None:
        """Advance the reservoir's generator past rows ``next..stop-1`` without keeping any."""
        for i in range(max(self.next, self.max_kept), stop):
            self.rng.integers(0, i + 1)
        self.next = max(self.next, stop)

    def recentred(self, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sums about another shift c: sum(x - c) and sum (x - c)(x - c)^T (exact algebra
        on this accumulator's sums about its own shift; no features needed)."""
        d = self.shift - shift
        return (self.sum + self.n * d,
                self.outer + np.outer(self.sum, d) + np.outer(d, self.sum)
                + self.n * np.outer(d, d))

    def combine(self, total: Reduce, largest: Reduce) -> "StatsAccumulator":
        """The accumulator of all rows, from the parts that several processes saw.

        Every process calls this at once with its part; ``total(a)`` and ``largest(a)`` are
        the elementwise sum and maximum of an array over the processes (`Processes.sum` and
        `max`). The sums are taken about the shift of the part that saw the lowest row, the
        shift one process would have used, and each reservoir slot keeps the highest row any
        part put there, the row one process would have left in it: the result does not depend
        on how the rows were split, up to the order of float additions.
        """
        width = int(largest(np.array([0 if self.shift is None else len(self.shift)]))[0])
        out = StatsAccumulator(self.max_kept, self.seed)
        out.n = int(total(np.array([self.n]))[0])
        out._draw_until(int(largest(np.array([self.next]))[0]))  # ready for more rows
        if width == 0:  # no part saw a row
            return out
        none = np.iinfo(np.int64).max
        out.first = int(-largest(np.array([-(none if self.first is None else self.first)]))[0])
        out.shift = total(self.shift if self.first == out.first else np.zeros(width))
        mine = self.recentred(out.shift) if self.n else (np.zeros(width),
                                                         np.zeros((width, width)))
        out.sum, out.outer = total(mine[0]), total(mine[1])
        out.kept = np.zeros((self.max_kept, width), np.float32)
        if self.max_kept:
            out.kept_index = largest(self.kept_index)
            own = (self.kept_index == out.kept_index) & (self.kept_index >= 0)
            if own.any():
                out.kept[own] = self.kept[own]
            out.kept = total(out.kept)  # exact: in each slot one part adds its row to zeros
        return out

    def result(self, meta: dict | None = None) -> Stats:
        """The mean and the unbiased covariance (as np.cov), and the kept features."""
        if self.n < 2:
            raise MetricError(f"need at least 2 images for a covariance; got {self.n}")
        mean_y = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean_y, mean_y)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry despite rounding
        kept = self.kept[: min(self.n, self.max_kept)].copy() if self.max_kept else None
        return Stats(self.shift + mean_y, sigma, self.n, kept, dict(meta or {}))


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------

def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's matrix square root, and whether scipy found `a` singular."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    return root, any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray, regularize: bool = False
                 ) -> tuple[float, float]:
    """Tr((s1 s2)^(1/2)) and the eps added to both covariances (0 when none was needed)."""
    eps = 0.0
    if not regularize:
        covmean, singular = _sqrtm(s1 @ s2)
        regularize = singular or not np.isfinite(covmean).all()
    if regularize:  # a singular product (e.g. fewer images than dimensions): N(mu, S + eps I)
        eps = SQRTM_EPS
        offset = np.eye(len(s1)) * eps
        covmean, _ = _sqrtm((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise MetricError("the matrix square root of the covariance product is not finite "
                              "even after regularisation; use more images")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > MAX_IMAG:
            raise MetricError(f"the covariance product has a matrix square root with imaginary "
                              f"part {imag:.3g} on its diagonal: the statistics are degenerate "
                              "or not covariances; use more images")
        covmean = covmean.real
    return float(np.trace(covmean)), eps


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, regularize: bool = False) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (float64).

    When S1 S2 is singular (or `regularize` says it will be), both covariances get eps I, in
    every term, so that a set's distance to itself stays 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise MetricError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, "
                          f"covariances {s1.shape} and {s2.shape}; were they made by the same "
                          "feature extractor?")
    tr_covmean, eps = _sqrtm_trace(s1, s2, regularize)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) + 2 * eps * len(mu1)
                 - 2 * tr_covmean)


def fid(a: Stats, b: Stats) -> float:
    """The Fréchet distance between two feature sets' statistics."""
    # no more images than dimensions: the covariance is singular for sure; regularise at once
    # (one square root instead of two: at 2048 dimensions each takes seconds)
    known = [n for n in (a.n, b.n) if n > 0]
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma,
                            regularize=bool(known) and min(known) <= len(a.mu))


def fid_interval(features: np.ndarray, ref: Stats, rounds: int = 200, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of the FID over the generated samples: how far the FID of this
    many samples moves when the samples are drawn again, around the FID measured.

    Each round redraws the samples' feature rows with replacement and recomputes the FID
    against the fixed reference statistics. Redrawing with replacement repeats rows, which
    shrinks the covariance's spread and raises every round's FID (for 2,000 real images, FID
    3.7, the rounds averaged 7.5), so the (1 - level)/2 and (1 + level)/2 quantiles of the
    rounds are moved down by that excess, their mean less the FID of all rows: the
    bias-corrected percentile interval, floored at 0. It needs every sample's features
    (`features` holds all n rows), and it covers the sampling noise of the generated set, not
    the reference's.
    """
    feats = np.asarray(features, np.float64)
    if rounds < 1 or len(feats) < 2:
        raise MetricError(f"a bootstrap needs at least one round and two samples; got "
                          f"{rounds} rounds and {len(feats)} samples")
    regularize = len(feats) <= feats.shape[1]

    def fid_of(f: np.ndarray) -> float:
        return frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref.mu, ref.sigma,
                                regularize=regularize)

    rng = np.random.default_rng(seed)
    fids = np.array([fid_of(feats[rng.integers(0, len(feats), len(feats))])
                     for _ in range(rounds)])
    excess = fids.mean() - fid_of(feats)
    lo, hi = np.quantile(fids, [(1 - level) / 2, (1 + level) / 2]) - excess
    return max(0.0, float(lo)), max(0.0, float(hi))


# --------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all pairs of rows: (n, d), (m, d) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD^2 (Gretton et al. 2012, eq. 3) with the cubic kernel."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    # the diagonals k(x_i, x_i) are left out: that is what makes the estimate unbiased
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the unbiased MMD^2 over random subsets of `x` and `y` (features)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise MetricError(f"KID needs at least 2 features on each side; got {len(x)} and "
                          f"{len(y)}")
    if m == len(x) == len(y):
        subsets = 1  # every subset would be the whole set
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)],
                            y[rng.choice(len(y), m, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------------------------
# IS
# --------------------------------------------------------------------------------------------

class ISAccumulator:
    """exp(E_x KL(p(y|x) || p(y))) per split, streamed from logits.

    KL averaged over x equals E_x[sum_y p log p] - sum_y p_bar log p_bar with p_bar = E_x p(y|x),
    so each split needs only a running sum of sum_y p log p and of p. Sample i goes to split
    i mod splits (interleaved, so the number of samples need not be known in advance).
    """

    def __init__(self, splits: int = IS_SPLITS):
        if splits < 1:
            raise MetricError(f"IS splits must be >= 1; got {splits}")
        self.splits, self.n = splits, 0
        self.neg_entropy = np.zeros(splits)
        self.count = np.zeros(splits)
        self.p_sum: np.ndarray | None = None

    def update(self, logits, start: int | None = None) -> None:
        """Add a batch of class logits (B, K); ``start``: the index of its first sample in the
        whole set (default: the count so far), which decides each sample's split."""
        z = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits,
                       dtype=np.float64)
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))  # log_softmax
        p = np.exp(logp)
        if self.p_sum is None:
            self.p_sum = np.zeros((self.splits, z.shape[1]))
        split = ((self.n if start is None else start) + np.arange(len(z))) % self.splits
        np.add.at(self.neg_entropy, split, (p * logp).sum(1))
        np.add.at(self.count, split, 1)
        np.add.at(self.p_sum, split, p)
        self.n += len(z)

    def combine(self, total: Reduce, largest: Reduce) -> "ISAccumulator":
        """The accumulator of all samples, from the parts that several processes saw (as
        `StatsAccumulator.combine`: every process calls it at once)."""
        classes = int(largest(np.array([0 if self.p_sum is None else self.p_sum.shape[1]]))[0])
        out = ISAccumulator(self.splits)
        out.n = int(total(np.array([self.n]))[0])
        out.neg_entropy, out.count = total(self.neg_entropy), total(self.count)
        if classes:
            out.p_sum = total(np.zeros((self.splits, classes)) if self.p_sum is None
                              else self.p_sum)
        return out

    def result(self) -> tuple[float, float]:
        """Mean and std (over splits) of the Inception Score."""
        if self.n < self.splits:
            raise MetricError(f"IS over {self.splits} splits needs at least {self.splits} "
                              f"images; got {self.n}")
        p_bar = self.p_sum / self.count[:, None]
        cross = np.where(p_bar > 0, p_bar * np.log(np.where(p_bar > 0, p_bar, 1)), 0).sum(1)
        scores = np.exp(self.neg_entropy / self.count - cross)
        return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------------------
# Cached statistics
# --------------------------------------------------------------------------------------------

def stats_key(dataset: str, split: str, image_size: int, extractor: str, weights_sha256: str,
              extra: str = "") -> str:
    """A file-name-safe cache key: dataset, split, size, extractor and its weights' hash."""
    parts = [dataset, split, f"{image_size}px", extractor, weights_sha256[:12]]
    if extra:
        parts.append(extra)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def stats_path(cache_dir: str | Path | None, key: str) -> Path:
    """Where the statistics of `key` live: ``cache_dir/key.npz`` (default ~/.cache/...)."""
    return (Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR).expanduser() / f"{key}.npz"


def save_stats(path: str | Path, stats: Stats) -> None:
    """Write mu, sigma, n, the kept features and the metadata (JSON) to an `.npz`, atomically."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n),
              "meta": np.array(json.dumps(stats.meta))}
    if stats.features is not None:
        arrays["features"] = stats.features

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(Path(path), write)


# The arrays of a statistics file (`io.arrays.read_npz` checks them as it reads)
STATS_ARRAYS = {"mu": Want("f", 1, rows=True), "sigma": Want("f", 2),
                "n": Want("iu", 0, required=False), "features": Want("f", 2, required=False),
                "meta": Want("U", 0, required=False)}


def load_stats(path: str | Path) -> Stats:
    """Read statistics written by `save_stats` (or any `.npz` with ``mu`` and ``sigma``)."""
    fix = "compute the statistics again"
    data = read_npz(path, STATS_ARRAYS, "statistics file", MetricError, fix)
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    meta = parse_checked(str(data["meta"]), f"{path}:meta", dict, MetricError, fix) \
        if "meta" in data else {}
    if sigma.shape != (len(mu), len(mu)):
        raise MetricError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together; "
                          f"{fix}")
    return Stats(mu, sigma, int(data.get("n", 0)), data.get("features"), meta)


# --------------------------------------------------------------------------------------------
# Detection: scores where higher means "more likely out of distribution"
# --------------------------------------------------------------------------------------------

def _scores(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(x) == 0 or not np.isfinite(x).all():
        raise MetricError(f"{name} must be a non-empty list of finite scores; got {len(x)} "
                          f"values{'' if np.isfinite(x).all() else ', some not finite'}")
    return x


def auroc(negatives, positives) -> float:
    """The area under the ROC curve of "positive when score >= threshold": the probability
    that a positive (out of distribution) scores above a negative (in distribution), ties
    counting one half; the Mann-Whitney U over n_neg n_pos, from midranks. 1: every positive
    above every negative; 0.5: no better than chance; below 0.5: the score points the wrong
    way."""
    neg, pos = _scores(negatives, "negatives"), _scores(positives, "positives")
    ranks = scipy.stats.rankdata(np.concatenate([neg, pos]))  # ties get their mean rank
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def auroc_standard_error(area: float, n_negatives: int, n_positives: int) -> float:
    """The standard error of an AUROC from n_negatives and n_positives scores (Hanley and
    McNeil 1982, eq. 2, with Q1 = A / (2 - A), Q2 = 2 A^2 / (1 + A))."""
    a = area
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_positives - 1) * (q1 - a * a)
           + (n_negatives - 1) * (q2 - a * a)) / (n_negatives * n_positives)
    return float(np.sqrt(max(var, 0.0)))


def fpr_at_tpr(negatives, positives, tpr: float = 0.95) -> float:
    """The fraction of negatives flagged at the highest threshold that flags at least ``tpr``
    of the positives: with the positives' scores sorted from the highest, the threshold is the
    ceil(tpr n_pos)-th, and negatives scoring at or above it count (ties with the threshold
    are flagged, as positives there are)."""
    if not 0 < tpr <= 1:
        raise MetricError(f"tpr must lie in (0, 1]; got {tpr!r}")
    neg, pos = _scores(negatives, "negatives"), _scores(positives, "positives")
    threshold = np.sort(pos)[::-1][int(np.ceil(tpr * len(pos) - 1e-9)) - 1]
    return float((neg >= threshold).mean())
