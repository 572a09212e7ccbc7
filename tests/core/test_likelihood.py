"""The bound on log p(x) (diffusevae.likelihood), checked against closed forms.

The oracle is Gaussian data with the exact noise predictor: if y0 ~ N(m_y, s^2) per pixel, then
y_t = a y0 + b eps (a = sqrt(ab_t), b = sqrt(1 - ab_t)) gives E[eps | y_t] =
b (y_t - a m_y) / (a^2 s^2 + b^2). That predictor is a valid model for *any* image, and with it
the expectation over the noise of every term of the bound is closed form in float64 (the
8-bit decoder's by a 1-D Gauss-Hermite quadrature per pixel). The references below are written
from the formulas, apart from the library: their own schedule, the posterior means, the KL of
two Gaussians, the CDF differences in mpmath.
"""

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch

from diffusevae.core import likelihood as lik
from diffusevae.core.diffusion import FORMULATIONS, Schedule, get_formulation, make_eps_fn
from diffusevae.errors import ConfigError
from diffusevae.core.prior import GaussianMixture
from diffusevae.rng import sample_generators
from oracles import tiny_pipeline

F64 = torch.float64
SHAPE = (1, 4, 4)  # (C, H, W) of the Gaussian images
D = math.prod(SHAPE)
FORMS = tuple(FORMULATIONS)
VAR_TYPES = ("fixedlarge", "fixedsmall")


# --------------------------------------------------------------------------------------------
# The reference: an own schedule, the exact predictor, the closed-form expectations
# --------------------------------------------------------------------------------------------

class Ref:
    """DDPM's linear schedule of T steps, 0-indexed, in float64 NumPy."""

    def __init__(self, T: int):
        self.T = T
        self.beta = np.linspace(1e-4, 0.02, T, dtype=np.float64)
        self.alpha = 1.0 - self.beta
        self.ab = np.cumprod(self.alpha)
        self.ab_prev = np.concatenate([[1.0], self.ab[:-1]])
        self.post_var = self.beta * (1.0 - self.ab_prev) / (1.0 - self.ab)
        self.c1 = self.beta * np.sqrt(self.ab_prev) / (1.0 - self.ab)  # of y0
        self.c2 = (1.0 - self.ab_prev) * np.sqrt(self.alpha) / (1.0 - self.ab)  # of y_t

    def model_var(self, t: int, var_type: str) -> float:
        """sigma_t^2: beta_t (fixedlarge) or beta_tilde_t (fixedsmall); beta_tilde_1 at t=0."""
        if t == 0:
            return self.post_var[1]
        return self.beta[t] if var_type == "fixedlarge" else self.post_var[t]


def exact_eps_fn(schedule: Schedule, m_y: torch.Tensor, s: float, error: float = 0.0):
    """E[eps | y_t] for y0 ~ N(m_y, s^2) per pixel; with ``error`` > 0 a worse model, which adds
    ``error`` times fresh standard normals to every prediction (from a generator of its own)."""
    g = torch.Generator().manual_seed(123)

    def eps_fn(y_t, t):
        a = schedule.sqrt_alpha_bar[t.cpu()].to(y_t.dtype).reshape(-1, 1, 1, 1)
        b = schedule.sqrt_one_minus_alpha_bar[t.cpu()].to(y_t.dtype).reshape(-1, 1, 1, 1)
        eps = b * (y_t - a * m_y) / (a * a * s * s + b * b)
        if error:
            eps = eps + error * torch.randn(y_t.shape, generator=g, dtype=y_t.dtype)
        return eps
    return eps_fn


def _sq_err(ref: Ref, t: int, y0: np.ndarray, m_y: np.ndarray, s: float) -> np.ndarray:
    """E_eps (eps_hat - eps)^2 per pixel: eps_hat - eps = k a (y0 - m_y) + (k b - 1) eps."""
    a, b = math.sqrt(ref.ab[t]), math.sqrt(1.0 - ref.ab[t])
    k = b / (a * a * s * s + b * b)
    return (k * a * (y0 - m_y)) ** 2 + (k * b - 1.0) ** 2


def _log_bin_prob(x: float, mean: float, sigma: float) -> float:
    """log P(bin of x) under N(mean, sigma^2) with the edge bins to +-inf, in mpmath at 60
    digits (an interval above the mean is mirrored below it, where the CDF does not round to
    1)."""
    with mpmath.workdps(60):
        k = round((x + 1.0) * 127.5)
        c = mpmath.mpf(k) / mpmath.mpf(127.5) - 1
        lo = -mpmath.inf if k == 0 else (c - mpmath.mpf(1) / 255 - mean) / sigma
        hi = mpmath.inf if k == 255 else (c + mpmath.mpf(1) / 255 - mean) / sigma
        if lo > 0:
            lo, hi = -hi, -lo
        return float(mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo)))


def _log_bin_prob_np(x: np.ndarray, mean: np.ndarray, sigma: float) -> np.ndarray:
    """`_log_bin_prob` vectorised in float64 with SciPy's ndtr (for the quadrature, where a
    relative error of 1e-12 is plenty)."""
    k = np.round((x + 1.0) * 127.5)
    lo = np.where(k == 0, -np.inf, (k / 127.5 - 1 - 1 / 255 - mean) / sigma)
    hi = np.where(k == 255, np.inf, (k / 127.5 - 1 + 1 / 255 - mean) / sigma)
    up = lo > 0
    lo, hi = np.where(up, -hi, lo), np.where(up, -lo, hi)
    return np.log(scipy.special.ndtr(hi) - scipy.special.ndtr(lo))


def analytic_nll(ref: Ref, y0: np.ndarray, m_y: np.ndarray, s: float, var_type: str,
                 decoder: str, x0: np.ndarray | None = None) -> dict[str, float]:
    """E over the noise of each cost of one image (y0, m_y, x0: flat arrays; x0 only for the
    discrete decoder), nats."""
    T = ref.T
    prior = 0.5 * np.sum(ref.ab[-1] * y0 ** 2 + (1 - ref.ab[-1]) - 1 - math.log(1 - ref.ab[-1]))
    steps = 0.0
    for t in range(1, T):
        var = ref.model_var(t, var_type)
        # mu_tilde - mu_theta = c1 (y0 - y0_hat), y0 - y0_hat = (b / a) (eps_hat - eps)
        gap2 = ref.c1[t] ** 2 * (1 - ref.ab[t]) / ref.ab[t] * _sq_err(ref, t, y0, m_y, s)
        pv = ref.post_var[t]
        steps += np.sum(0.5 * (math.log(var / pv) + pv / var - 1) + gap2 / (2 * var))
    var0 = ref.model_var(0, var_type)
    if decoder == "continuous":
        err2 = (1 - ref.ab[0]) / ref.ab[0] * _sq_err(ref, 0, y0, m_y, s)
        dec = np.sum(0.5 * math.log(2 * math.pi * var0) + err2 / (2 * var0))
    else:  # mean(eps) = readback(y0_hat) = x0 - (b/a)(k a (y0 - m_y) + (k b - 1) eps)
        a, b = math.sqrt(ref.ab[0]), math.sqrt(1 - ref.ab[0])
        k = b / (a * a * s * s + b * b)
        nodes, weights = np.polynomial.hermite_e.hermegauss(40)
        mean = x0[:, None] - b / a * (k * a * (y0 - m_y)[:, None] + (k * b - 1) * nodes)
        log_p = _log_bin_prob_np(np.broadcast_to(x0[:, None], mean.shape), mean,
                                 math.sqrt(var0))
        dec = -float(np.sum(log_p * weights)) / math.sqrt(2 * math.pi)
    return {"prior": prior, "steps": steps, "decoder": dec}


def gaussian_images(n: int, s: float, seed: int, quantize: bool = False):
    """Means m (C, H, W) in [-0.4, 0.4], a fixed x_hat, and n images x0 ~ N(m, s^2) (8-bit
    levels when ``quantize``), float64."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(SHAPE, generator=g, dtype=F64) - 0.5) * 0.8
    x_hat = (torch.rand(SHAPE, generator=g, dtype=F64) - 0.5) * 1.2
    x0 = (m + s * torch.randn((n, *SHAPE), generator=g, dtype=F64)).clamp(-1, 1)
    if quantize:
        x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    return m, x_hat, x0


# --------------------------------------------------------------------------------------------
# (a) the estimator's mean is the closed-form bound, in every formulation and variance
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("form_name", FORMS)
@pytest.mark.parametrize("decoder", lik.DECODERS)
def test_estimate_matches_the_closed_form(form_name, var_type, decoder):
    """Summed over 24 images, the stratified estimate (K = 200) of each part is within 4 of its
    stated standard errors of the closed-form expectation; the prior term is exact."""
    T, s, n = 1000, 0.1, 24
    ref, schedule, form = Ref(T), Schedule.linear(T), get_formulation(form_name)
    m, x_hat, x0 = gaussian_images(n, s, seed=1, quantize=decoder == "discrete")
    x_hat_b = x_hat.expand(n, *SHAPE) if form.conditioned else None
    m_y = form.target(m, x_hat if form.conditioned else None)
    est = lik.diffusion_terms(exact_eps_fn(schedule, m_y, s), schedule, form, x0, x_hat_b,
                              generators=sample_generators(7, range(n)), strata=200,
                              var_type=var_type, decoder=decoder)
    want = {"prior": 0.0, "steps": 0.0, "decoder": 0.0}
    for i in range(n):
        y0 = form.target(x0[i], x_hat if form.conditioned else None)
        got = analytic_nll(ref, y0.flatten().numpy(), m_y.flatten().numpy(), s, var_type,
                           decoder, x0[i].flatten().numpy())
        want = {k: want[k] + got[k] for k in want}
    assert float(est.prior.sum()) == pytest.approx(want["prior"], rel=1e-10, abs=1e-12)
    for part in ("steps", "decoder"):
        se = float(getattr(est, part + "_se").square().sum().sqrt())
        assert 0 < se < 0.1 * abs(want[part]) + 1.0  # informative, not infinite
        assert abs(float(getattr(est, part).sum()) - want[part]) < 4 * se, part


def test_standard_error_is_calibrated():
    """Over 1000 independent estimates of one image, the stated standard error (the root mean
    of the stated variances) is the actual spread within 15%: two draws a stratum give an
    unbiased variance; K = 3 is one stratum of three draws, K = 2 one of two. The exact sum's
    collapsed-strata error is not smaller than its spread (it is conservative). The decoder's,
    from two draws, is unbiased for the variance."""
    T, s, n = 1000, 0.1, 1000
    schedule, form = Schedule.linear(T), get_formulation("uncond")
    m, _, x0 = gaussian_images(1, s, seed=2)
    for K in (2, 3, 10, 50, 100, "exact"):
        est = lik.diffusion_terms(exact_eps_fn(schedule, m, s), schedule, form,
                                  x0.expand(n, *SHAPE), generators=sample_generators(3, range(n)),
                                  strata=100 if K == "exact" else K, exact=K == "exact",
                                  decoder="continuous")
        spread, stated = float(est.steps.std()), float(est.steps_se.square().mean().sqrt())
        low, high = (0.9, 3.0) if K == "exact" else (0.85, 1.15)
        assert low * spread < stated < high * spread, K
        dec_spread = float(est.decoder.std())
        assert 0.85 * dec_spread < float(est.decoder_se.square().mean().sqrt()) < 1.15 * dec_spread


@pytest.mark.parametrize("K", (4, 10, 100))
def test_geometric_strata_are_unbiased(K):
    """The mean of 2000 independent estimates of one image's steps is within 4 standard errors
    of the mean of the closed-form sum, for few wide strata (K = 4: two strata of 31 and 968
    steps) and for the default K = 100 (single steps first); with K = 100 that error is 0.5% of
    the sum, so a bias of 1% (a stratum weighed wrong, its last step never drawn) would fail."""
    T, s, n = 1000, 0.1, 2000
    schedule, form = Schedule.linear(T), get_formulation("uncond")
    m, _, x0 = gaussian_images(1, s, seed=11)
    est = lik.diffusion_terms(exact_eps_fn(schedule, m, s), schedule, form,
                              x0.expand(n, *SHAPE), generators=sample_generators(5, range(n)),
                              strata=K, decoder="continuous")
    want = analytic_nll(Ref(T), x0[0].flatten().numpy(), m.flatten().numpy(), s, "fixedlarge",
                        "continuous")["steps"]
    se_mean = float(est.steps.std()) / math.sqrt(n)
    assert abs(float(est.steps.mean()) - want) < 4 * se_mean
    if K == 100:
        assert 4 * se_mean < 0.005 * want


# --------------------------------------------------------------------------------------------
# (b) each term for given noise matches a float64 reference to 1e-10
# --------------------------------------------------------------------------------------------

def _gauss_kl_sum(m1, v1, m2, v2) -> float:
    return float(np.sum(0.5 * (np.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1)))


@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_each_term_matches_a_reference(var_type):
    """step_kl from the posterior and model means written out (DDPM eq. 6-7, the mean at the
    predicted y0), prior_term, and decoder_nll (discrete: mpmath CDFs; continuous: the
    density), for given noise and predictions, to 1e-10 relative."""
    T, B = 1000, 3
    ref, schedule = Ref(T), Schedule.linear(T)
    g = torch.Generator().manual_seed(5)
    x0 = torch.round(torch.rand((B, *SHAPE), generator=g, dtype=F64) * 255) / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the two edge bins
    y0 = x0 - 0.3  # some coordinate; the terms take y0 as given
    for t in (1, 2, 17, 500, 999):
        eps = torch.randn((B, *SHAPE), generator=g, dtype=F64)
        eps_pred = eps + 0.3 * torch.randn((B, *SHAPE), generator=g, dtype=F64)
        tt = torch.full((B,), t)
        got = lik.step_kl(schedule, tt, eps, eps_pred, var_type)
        a, b = math.sqrt(ref.ab[t]), math.sqrt(1 - ref.ab[t])
        for i in range(B):
            y0n, en, pn = y0[i].numpy(), eps[i].numpy(), eps_pred[i].numpy()
            y_t = a * y0n + b * en
            y0_hat = (y_t - b * pn) / a
            want = _gauss_kl_sum(ref.c1[t] * y0n + ref.c2[t] * y_t, ref.post_var[t],
                                 ref.c1[t] * y0_hat + ref.c2[t] * y_t, ref.model_var(t, var_type))
            assert float(got[i]) == pytest.approx(want, rel=1e-10)

    got = lik.prior_term(schedule, y0)
    for i in range(B):
        aT = ref.ab[-1]
        assert float(got[i]) == pytest.approx(_gauss_kl_sum(
            math.sqrt(aT) * y0[i].numpy(), 1 - aT, 0.0, 1.0), rel=1e-10)

    mean = x0 + 0.01 * torch.randn((B, *SHAPE), generator=g, dtype=F64)
    mean[1] += 0.5  # far from the pixels: the tails
    sigma = math.sqrt(ref.model_var(0, var_type))
    disc = lik.decoder_nll(schedule, x0, mean, var_type, "discrete")
    cont = lik.decoder_nll(schedule, x0, mean, var_type, "continuous")
    for i in range(B):
        xs, ms = x0[i].flatten().tolist(), mean[i].flatten().tolist()
        want = -sum(_log_bin_prob(x, mu, sigma) for x, mu in zip(xs, ms))
        assert float(disc[i]) == pytest.approx(want, rel=1e-10)
        want = sum(0.5 * math.log(2 * math.pi * sigma ** 2) + (x - mu) ** 2 / (2 * sigma ** 2)
                   for x, mu in zip(xs, ms))
        assert float(cont[i]) == pytest.approx(want, rel=1e-10)


def _reference_kl(ref: Ref, s: float, t: int, y0: np.ndarray, m_y: np.ndarray,
                  e: np.ndarray) -> float:
    """The fixedlarge step KL of one image at step t for noise e, written out (DDPM eq. 6-7)
    with the exact predictor of y0 ~ N(m_y, s^2)."""
    a, b = math.sqrt(ref.ab[t]), math.sqrt(1 - ref.ab[t])
    y_t = a * y0 + b * e
    pred = b * (y_t - a * m_y) / (a * a * s * s + b * b)
    return _gauss_kl_sum(ref.c1[t] * y0 + ref.c2[t] * y_t, ref.post_var[t],
                         ref.c1[t] * (y_t - b * pred) / a + ref.c2[t] * y_t, ref.beta[t])


def _gaussian_form2_case(T: int, s: float, B: int):
    m, x_hat, x0 = gaussian_images(B, s, seed=3, quantize=True)
    schedule = Schedule.linear(T)
    return m, x_hat, x0, lambda **kw: lik.diffusion_terms(
        exact_eps_fn(schedule, m - x_hat, s), schedule, get_formulation("form2"), x0,
        x_hat.expand(B, *SHAPE), generators=sample_generators(4, range(B)), **kw)


def _reference_decoder(ref: Ref, s: float, x0: np.ndarray, x_hat: np.ndarray, m_y: np.ndarray,
                       e: np.ndarray) -> float:
    """-log p(x0 | y_1) of one form2 image for noise e: the mean read back from the exact
    predictor's y0 at step 0, plus x_hat, scored by the 8-bit bins of scale sqrt(beta_tilde_1)."""
    a, b = math.sqrt(ref.ab[0]), math.sqrt(1 - ref.ab[0])
    y_1 = a * (x0 - x_hat) + b * e
    pred = b * (y_1 - a * m_y) / (a * a * s * s + b * b)
    mean = (y_1 - b * pred) / a + x_hat
    return -float(_log_bin_prob_np(x0, mean, math.sqrt(ref.model_var(0, "fixedlarge"))).sum())


def test_exact_sum_is_every_step_with_the_documented_draws():
    """exact=True is the sum of the reference KLs over t = 1..T-1 with the noise drawn from each
    image's generator in the documented order (K uniforms, DECODER_DRAWS decoder noises, then
    one noise per step); the decoder term is the mean of the reference decoder costs of those
    noises, its standard error their standard deviation over sqrt(DECODER_DRAWS)."""
    T, s, B = 30, 0.2, 3
    ref = Ref(T)
    m, x_hat, x0, terms = _gaussian_form2_case(T, s, B)
    exact = terms(exact=True)
    for i, g in enumerate(sample_generators(4, range(B))):
        torch.rand(T - 1, generator=g, dtype=F64)
        dec = [_reference_decoder(ref, s, x0[i].numpy(), x_hat.numpy(), (m - x_hat).numpy(),
                                  torch.randn(SHAPE, generator=g).double().numpy())
               for _ in range(lik.DECODER_DRAWS)]
        assert float(exact.decoder[i]) == pytest.approx(np.mean(dec), rel=1e-9)
        assert float(exact.decoder_se[i]) == pytest.approx(
            np.std(dec, ddof=1) / math.sqrt(len(dec)), rel=1e-6)
        y0, m_y = (x0[i] - x_hat).numpy(), (m - x_hat).numpy()
        total = sum(_reference_kl(ref, s, t, y0, m_y, torch.randn(SHAPE, generator=g).double()
                                  .numpy()) for t in range(1, T))
        assert float(exact.steps[i]) == pytest.approx(total, rel=1e-10)


@pytest.mark.parametrize("K", (1, 2, 7, 12))
def test_stratified_estimate_with_the_documented_draws(K):
    """strata=K places its K draws two to a stratum of `strata_bounds` (the last three when K
    is odd), draw j at step start + floor(u_j n) of its stratum, and weighs each KL by n / m
    of its stratum; the standard error is sqrt(sum_k n_k^2 s_k^2 / m_k), nan for K = 1: the
    reference written from the documented draws and formulas."""
    T, s, B = 30, 0.2, 3
    ref = Ref(T)
    m, x_hat, x0, terms = _gaussian_form2_case(T, s, B)
    est = terms(strata=K)
    S = max(1, K // 2)
    starts, sizes = lik.strata_bounds(T, S)
    draws = [2] * (S - 1) + [K - 2 * (S - 1)]
    for i, g in enumerate(sample_generators(4, range(B))):
        u = torch.rand(K, generator=g, dtype=F64).tolist()
        [torch.randn(SHAPE, generator=g) for _ in range(lik.DECODER_DRAWS)]
        y0, m_y = (x0[i] - x_hat).numpy(), (m - x_hat).numpy()
        total, var, j = 0.0, 0.0, 0
        for k in range(S):
            start, n = int(starts[k]), int(sizes[k])
            kls = [_reference_kl(ref, s, start + math.floor(u[j + r] * n), y0, m_y,
                                 torch.randn(SHAPE, generator=g).double().numpy())
                   for r in range(draws[k])]
            j += draws[k]
            total += n * sum(kls) / len(kls)
            var += n * n * (np.var(kls, ddof=1) if len(kls) > 1 else math.nan) / len(kls)
        assert float(est.steps[i]) == pytest.approx(total, rel=1e-10)
        if K == 1:
            assert math.isnan(float(est.steps_se[i]))
        else:
            assert float(est.steps_se[i]) == pytest.approx(math.sqrt(var), rel=1e-8)


def test_strata_are_geometric_and_cover_every_step():
    """The strata of `strata_bounds` are contiguous, cover 1..T-1 once, hold at least one step
    each and never shrink; at T = 1000 and S = 50 the first twelve are single steps and the
    sizes after them grow by about the same ratio, as a geometric sequence does."""
    for T, S in ((1000, 50), (1000, 1), (1000, 999), (1000, 500), (30, 3), (20, 19), (5, 2)):
        starts, sizes = lik.strata_bounds(T, S)
        assert len(sizes) == S and int(starts[0]) == 1 and (sizes >= 1).all()
        assert torch.equal(starts[1:], starts[:-1] + sizes[:-1]), (T, S)
        assert int(starts[-1] + sizes[-1]) == T and (sizes[1:] >= sizes[:-1]).all(), (T, S)
    starts, sizes = lik.strata_bounds(1000, 50)
    assert sizes[:12].tolist() == [1] * 12 and sizes[12:14].tolist() == [2, 2]
    ratio = (sizes[30:].double().log().diff())
    assert float(ratio.mean()) == pytest.approx(0.11, abs=0.02)
    assert lik.strata_bounds(1000, 2)[1].tolist() == [31, 968]  # sqrt(1000) - 1 = 30.6


# --------------------------------------------------------------------------------------------
# (c) the bound never exceeds the log-likelihood
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("decoder", lik.DECODERS)
def test_bound_is_below_the_log_likelihood(decoder, var_type):
    """E_data[bound] <= E_data[log p_theta(x)] <= E_data[log p_data(x)]: the first because the
    bound is one on the model's own log-likelihood (Jensen), the second by Gibbs' inequality
    (cross-entropy >= entropy). Per image neither need hold, so the test pairs each image's
    bound with its exact log-probability under the data's law, the Gaussian density or, for
    8-bit data, the product of its pixels' bin probabilities under N(m, s^2) (the law of the
    clamped, quantized images exactly), and asks that the mean difference is not negative
    beyond 4 standard errors (every step summed, exact=True; the gap is 1 to 8 nats of 16
    pixels, its error about 0.3, so a bound too high by 0.2 bits/dim fails). The model is
    not the data's own (the reverse
    steps have fixed variances), so the gap is positive; for the continuous decoder it is also
    known: test (a)'s closed form, quadratic in y0, averaged over y0 ~ N(m_y, s^2) by the
    two points m_y +- s (exact for a quadratic), lies above the entropy, and the estimate
    matches it."""
    T, n, form = 1000, 200, get_formulation("form2")
    schedule = Schedule.linear(T)
    for s in (0.05, 0.15):
        m, x_hat, x0 = gaussian_images(n, s, seed=4, quantize=decoder == "discrete")
        m_y = m - x_hat
        est = lik.likelihood_bound(
            x0, schedule, form, lambda xh, z: exact_eps_fn(schedule, m_y, s),
            encode=lambda x: (torch.zeros(len(x), 2, dtype=F64), torch.zeros(len(x), 2,
                                                                             dtype=F64)),
            decode=lambda z: x_hat.expand(len(z), *SHAPE), seed=8, exact=True,
            var_type=var_type, decoder=decoder)
        assert torch.equal(est.rate, torch.zeros(n))  # q(z|x) = N(0, I) = p(z)
        if decoder == "continuous":
            assert (x0.abs() < 1).all()  # no pixel clamped: the density is the law
            log_p = (-0.5 * ((x0 - m) / s) ** 2 - 0.5 * math.log(2 * math.pi * s * s))
            log_p = log_p.flatten(1).sum(1)
        else:
            log_p = torch.from_numpy(_log_bin_prob_np(
                x0.flatten(1).numpy(), np.broadcast_to(m.flatten().numpy(), (n, D)), s).sum(1))
        gap = est.nats + log_p  # -bound - (-log p_data), per image
        assert float(gap.mean()) + 4 * float(gap.std()) / math.sqrt(n) > 0
        if decoder == "continuous":
            ref, y = Ref(T), m_y.flatten().numpy()
            expected = sum(0.5 * sum(analytic_nll(ref, y + sign * s, y, s, var_type,
                                                  decoder).values()) for sign in (1, -1))
            assert expected > 0.5 * D * math.log(2 * math.pi * math.e * s * s)  # the entropy
            assert abs(float(est.nats.mean()) - expected) < 4 * float(est.nats.std()) / n ** .5


# --------------------------------------------------------------------------------------------
# The 8-bit decoder
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, F64))
def test_the_256_levels_sum_to_one(dtype):
    """For means inside, at the edge of and far outside [-1, 1], and scales from 1e-6 to 20,
    the probabilities of the 256 levels of a pixel sum to 1 and are all positive."""
    x = (torch.arange(256, dtype=dtype) / 127.5 - 1).reshape(256, 1, 1, 1)
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    for mean in (-7.0, -1.0, -0.999, 0.0, 1 / 255, 0.37, 1.0, 3.0, 40.0):
        for log_scale in (math.log(1e-6), -8.0, -5.0, -2.0, 0.0, 3.0):
            lp = lik.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), log_scale)
            assert torch.isfinite(lp).all() and (lp <= 0).all()
            assert abs(float(lp.double().exp().sum()) - 1.0) < tol, (mean, log_scale)


def test_decoder_is_accurate_in_the_tails():
    """log P of a bin 30 and 300 scales away matches mpmath (no log(0) = -inf)."""
    x = torch.tensor([0.2, -1.0, 1.0, 0.2], dtype=F64).reshape(4, 1, 1, 1)
    mean = torch.tensor([0.2 + 30 * 0.01, 0.5, -0.5, 0.2 - 300 * 0.01], dtype=F64)
    lp = lik.discretized_gaussian_log_likelihood(x, mean.reshape(4, 1, 1, 1), math.log(0.01))
    for i in range(4):
        want = _log_bin_prob(float(x[i]), float(mean[i]), 0.01)
        assert float(lp[i]) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------------------------
# The rate, the assembly, worse models, determinism
# --------------------------------------------------------------------------------------------

def test_rate_closed_form_and_monte_carlo():
    """normal_rate is KL(N(mu, sigma^2) || N(0, I)); the Monte Carlo rate against a mixture of
    one full-covariance Gaussian N(c, S) is within 4 standard errors of the closed form
    (tr(S^-1 Sq) + (c - mu)' S^-1 (c - mu) - d + log det S - log det Sq) / 2."""
    g = torch.Generator().manual_seed(6)
    B, d, M = 5, 3, 4000
    mu, logvar = torch.randn(B, d, generator=g, dtype=F64), 0.5 * torch.randn(B, d, generator=g,
                                                                            dtype=F64)
    want = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    assert torch.allclose(lik.normal_rate(mu, logvar), want, rtol=1e-12)
    A = torch.randn(d, d, generator=g, dtype=F64)
    S, c = A @ A.T + 0.5 * torch.eye(d, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    mix = GaussianMixture(torch.ones(1), c[None], S[None])
    noise = torch.randn(B, M, d, generator=g, dtype=F64)
    rate, se = lik.monte_carlo_rate(mu, logvar, mix.log_prob, noise)
    Si = torch.linalg.inv(S)
    for i in range(B):
        Sq, diff = torch.diag(logvar[i].exp()), c - mu[i]
        kl = 0.5 * (torch.trace(Si @ Sq) + diff @ Si @ diff - d + torch.logdet(S)
                    - logvar[i].sum())
        assert abs(float(rate[i] - kl)) < 4 * float(se[i]) and 0 < float(se[i]) < 0.1


class ToyVAE:
    """encode: mu = a slice of the pixels, logvar -1; decode: tanh of a fixed linear map."""

    def __init__(self, d: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d, self.W = d, torch.randn(d, D, generator=g, dtype=F64)

    def encode(self, x):
        mu = x.flatten(1)[:, :self.d] * 2.0
        return mu, torch.full_like(mu, -1.0)

    def decode(self, z):
        return torch.tanh(0.5 * z @ self.W.to(z.dtype)).reshape(len(z), *SHAPE)


def _bound(x0, m, s, *, error=0.0, seed=9, first_index=0, log_prior=None, form="form2",
           strata=20, schedule=None):
    schedule = schedule or Schedule.linear(1000)
    f = get_formulation(form)
    vae = ToyVAE()

    def eps_fn_for(x_hat, z):
        return exact_eps_fn(schedule, f.target(m, x_hat) if f.conditioned else m, s, error)

    return lik.likelihood_bound(x0, schedule, f, eps_fn_for,
                                encode=vae.encode if f.conditioned else None,
                                decode=vae.decode if f.conditioned else None,
                                log_prior=log_prior, seed=seed, first_index=first_index,
                                strata=strata)


def test_parts_sum_and_the_latent_draws():
    """The parts in bits/dim sum to the total; with the normal prior the rate is the closed
    form of the encoder's (mu, logvar) and log_prior_z is log N(z) of z = mu + sigma eps_z,
    eps_z the first draw of the image's generator; with a mixture, log_prior_z is its
    log_prob(z) and the rate a Monte Carlo estimate with a standard error."""
    m, _, x0 = gaussian_images(4, 0.2, seed=5, quantize=True)
    out = _bound(x0, m, 0.2)
    parts = out.parts_bits_per_dim()
    assert torch.allclose(sum(parts.values()), out.bits_per_dim, rtol=1e-12)
    assert torch.allclose(out.bits_per_dim, -out.bound / (D * math.log(2)), rtol=1e-12)
    mu, logvar = ToyVAE().encode(x0)
    assert torch.allclose(out.rate, lik.normal_rate(mu, logvar), rtol=1e-12)
    z = torch.stack([mu[i] + math.exp(-0.5) * torch.randn(3, generator=g).double()
                     for i, g in enumerate(sample_generators(9, range(4)))])
    assert torch.allclose(out.log_prior_z, -0.5 * (z ** 2).sum(1) - 1.5 * math.log(2 * math.pi))
    mix = GaussianMixture(torch.tensor([0.3, 0.7]), torch.randn(2, 3, dtype=F64),
                          torch.eye(3, dtype=F64).expand(2, 3, 3) * 2)
    out_mix = _bound(x0, m, 0.2, log_prior=mix.log_prob)
    assert torch.allclose(out_mix.log_prior_z, mix.log_prob(z))
    assert (out_mix.rate_se > 0).all() and torch.equal(out.rate_se, torch.zeros(4))
    assert torch.equal(out_mix.prior, out.prior)  # the same z, hence the same x_hat


@pytest.mark.parametrize("form", FORMS)
def test_a_worse_noise_predictor_scores_worse(form):
    """Exact eps plus 0.5 N(0, I) noise: with the same draws, every image's bits/dim (and its
    steps term) strictly higher. (A constant error would not do: the exact predictor is exact
    on average over the data, and for one image below the mean a shift can help.)"""
    m, _, x0 = gaussian_images(6, 0.2, seed=6, quantize=True)
    good, bad = _bound(x0, m, 0.2, form=form), _bound(x0, m, 0.2, error=0.5, form=form)
    assert (bad.bits_per_dim > good.bits_per_dim).all()
    assert (bad.steps > good.steps).all()
    assert torch.equal(bad.prior, good.prior) and torch.equal(bad.rate, good.rate)


def test_same_seed_same_numbers_in_any_batch():
    """Images 0..5 in one batch, or as 2 + 3 + 1 with first_index, give the same numbers; a
    mixture prior included. The uncond bound has no rate."""
    m, _, x0 = gaussian_images(6, 0.2, seed=7, quantize=True)
    mix = GaussianMixture(torch.ones(1), torch.zeros(1, 3), torch.eye(3)[None])
    whole = _bound(x0, m, 0.2, log_prior=mix.log_prob)
    parts = lik.LikelihoodBound.cat([_bound(x0[a:b], m, 0.2, first_index=a,
                                            log_prior=mix.log_prob)
                                     for a, b in ((0, 2), (2, 5), (5, 6))])
    for f in ("rate", "rate_se", "prior", "steps", "steps_se", "decoder", "decoder_se",
              "log_prior_z"):
        assert torch.allclose(getattr(whole, f), getattr(parts, f), rtol=1e-13, atol=0), f
    other = _bound(x0, m, 0.2, seed=10, log_prior=mix.log_prob)
    assert not torch.allclose(other.steps, whole.steps)
    plain = _bound(x0, m, 0.2, form="uncond")
    assert torch.equal(plain.rate, torch.zeros(6)) and plain.log_prior_z is None


def test_float32_agrees_with_float64():
    m, _, x0 = gaussian_images(3, 0.2, seed=8, quantize=True)
    b64 = _bound(x0, m, 0.2)
    b32 = _bound(x0.float(), m.float(), 0.2)
    assert torch.allclose(b32.bits_per_dim, b64.bits_per_dim, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

def _terms(x0=None, **kw):
    schedule = Schedule.linear(20)
    x0 = torch.full((2, *SHAPE), -1.0) if x0 is None else x0
    args = dict(generators=sample_generators(0, range(len(x0))), strata=5)
    args.update(kw)
    return lik.diffusion_terms(lambda y, t: torch.zeros_like(y), schedule,
                               get_formulation("uncond"), x0, **args)


@pytest.mark.parametrize("kwargs, words", [
    ({"strata": 0}, "strata must be an integer in 1..19"),
    ({"strata": 20}, "strata must be an integer in 1..19"),
    ({"strata": 2.5}, "strata"),
    ({"strata": True}, "strata"),
    ({"var_type": "learned"}, "var_type must be one of fixedlarge, fixedsmall"),
    ({"decoder": "logistic"}, "decoder must be one of"),
    ({"x0": torch.zeros(*SHAPE)}, "x0 must be a floating-point batch"),
    ({"x0": torch.zeros(0, *SHAPE)}, "x0 must be a floating-point batch"),
    ({"x0": torch.zeros(2, *SHAPE, dtype=torch.long)}, "x0 must be a floating-point batch"),
    ({"x0": torch.full((2, *SHAPE), math.nan)}, "x0 holds nan or inf"),
    ({"x0": torch.full((2, *SHAPE), math.inf)}, "x0 holds nan or inf"),
    ({"x0": torch.full((2, *SHAPE), 1.5)}, "x0 must lie in [-1, 1]"),
    ({"x0": torch.full((2, *SHAPE), 0.3)}, "x0 is not 8-bit"),
    ({"generators": sample_generators(0, range(3))}, "one generator per image"),
])
def test_bad_arguments_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=None) as info:
        _terms(**kwargs)
    assert words in str(info.value) and "--" not in str(info.value)


def test_bad_arguments_of_the_whole_bound_are_refused():
    schedule, x0 = Schedule.linear(20), torch.full((2, *SHAPE), -1.0)
    vae = ToyVAE()
    cases = [
        (dict(form=get_formulation("form2")), "needs encode and decode"),
        (dict(form=get_formulation("uncond"), encode=vae.encode, decode=vae.decode),
         "has no VAE"),
        (dict(form=get_formulation("uncond"), log_prior=lambda z: z.sum(1)), "log_prior=None"),
        (dict(form=get_formulation("form2"), encode=vae.encode, decode=vae.decode,
              log_prior=lambda z: z.sum(1), rate_samples=1), "rate_samples must be"),
        (dict(form=get_formulation("form2"), encode=vae.encode,
              decode=lambda z: torch.zeros(len(z), 1, 2, 2)), "x_hat must be shaped like x0"),
        (dict(form=get_formulation("uncond"), eps=lambda y, t: y[:, :0]), "eps_fn must return"),
    ]
    for kw, words in cases:
        eps = kw.pop("eps", lambda y, t: torch.zeros_like(y))
        form = kw.pop("form")
        with pytest.raises(ConfigError) as info:
            lik.likelihood_bound(x0, schedule, form, lambda xh, z: eps, strata=3, **kw)
        assert words in str(info.value) and "--" not in str(info.value), words
    with pytest.raises(ConfigError, match="T >= 2"):
        lik.diffusion_terms(lambda y, t: y, Schedule.linear(1), get_formulation("uncond"), x0,
                            generators=sample_generators(0, range(2)))
    with pytest.raises(ConfigError, match="steps t in 1..19"):
        lik.step_kl(schedule, torch.zeros(2, dtype=torch.long), x0, x0)


# --------------------------------------------------------------------------------------------
# A tiny random DiffuseVAE
# --------------------------------------------------------------------------------------------

def _tiny_pipe(form="form2", T=20):
    return tiny_pipeline(form, timesteps=T)


def _digits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=g).float() / 127.5 - 1


def test_tiny_model_exact_and_stratified_agree():
    """On a random tiny refiner (T = 20), the exact sum and a 4-strata estimate of the same
    images (other seeds) agree within 4 combined standard errors, per image and on the mean;
    the pipeline's method gives what the library gives from the same parts."""
    pipe, x = _tiny_pipe(), _digits(6)
    exact = pipe.log_likelihood_bound(x, seed=1, exact=True)
    strat = pipe.log_likelihood_bound(x, seed=2, strata=4)
    assert torch.isfinite(exact.bits_per_dim).all() and (exact.bits_per_dim > 0).all()
    se = (exact.se ** 2 + strat.se ** 2).sqrt()
    assert (se > 0).all()
    # the z draw differs between the seeds; the terms that depend on z are compared as well
    assert ((exact.nats - strat.nats).abs() < 4 * se + 0.05 * exact.nats).all()
    by_hand = lik.likelihood_bound(
        x, pipe.schedule, pipe.form,
        lambda xh, z: make_eps_fn(pipe.unet, pipe.form, xh), encode=pipe.vae.encode,
        decode=lambda z: pipe.vae.decode(z).clamp(-1, 1), seed=2, strata=4)
    assert torch.allclose(by_hand.nats, strat.nats, rtol=1e-5)


def test_tiny_model_batches_priors_and_refusals():
    pipe, x = _tiny_pipe(), _digits(5, seed=1)
    whole = pipe.log_likelihood_bound(x, seed=3, strata=5)
    parts = lik.LikelihoodBound.cat([pipe.log_likelihood_bound(x[:2], seed=3, strata=5),
                                     pipe.log_likelihood_bound(x[2:], seed=3, strata=5,
                                                               first_index=2)])
    assert torch.allclose(whole.nats, parts.nats, rtol=1e-5)
    with pytest.raises(ConfigError, match="no fitted latent prior"):
        pipe.log_likelihood_bound(x, prior="gmm")
    pipe.prior = GaussianMixture(torch.ones(1), torch.zeros(1, 16), torch.eye(16)[None])
    gmm = pipe.log_likelihood_bound(x, seed=3, strata=5, prior="gmm")
    assert torch.allclose(gmm.rate, whole.rate, atol=5 * float(gmm.rate_se.max()))
    assert torch.equal(gmm.steps, whole.steps)  # the same z: the rate's draws come after it
    with pytest.raises(ConfigError, match="the refiner takes images of shape"):
        pipe.log_likelihood_bound(torch.zeros(2, 1, 8, 8))
    plain = _tiny_pipe("uncond").log_likelihood_bound(x, seed=3, strata=5)
    assert torch.equal(plain.rate, torch.zeros(5)) and plain.log_prior_z is None
