"""The model's bound on log p(x0), in bits per dimension (docs/likelihood.md).

With z ~ q(z|x0) the VAE's posterior and x_hat = D(z), Jensen's inequality gives

    log p(x0) >= E_{q(z|x0)} [ L_diff(x0; x_hat(z)) ] - KL(q(z|x0) || p(z))

where L_diff is the DDPM variational bound (Ho et al. 2020, eq. 5) of the refiner, run in its
formulation's coordinate y (y0 = `Formulation.target`). In the paper's numbering (states
y_1..y_T; the code's step index is the paper's step minus one):

    -L_diff = KL(q(y_T|y0) || N(0, I))                                   the prior term
            + sum_{t=2..T} E_q KL(q(y_{t-1}|y_t, y0) || p_theta(y_{t-1}|y_t))   the steps
            - E_q log p_theta(x0 | y_1)                                   the decoder

Everything here is a cost in nats (-log of a probability, or a KL), per image, float64 on the
CPU; bits per dimension are nats / (C H W ln 2) of the 8-bit image. The VAE's reconstruction
term is not part of the bound: the refiner's decoder already scores x0 given x_hat.

Randomness: image i draws everything from its own generator, that of (seed, i)
(`rng.sample_generators`), in a fixed order, so an estimate does not depend on the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import names
from .diffusion import EpsFn, Formulation, Schedule, predict_y0, q_sample
from ..errors import ConfigError
from ..rng import randn_like_per_sample, sample_generators

DECODERS = ("discrete", "continuous")  # the 8-bit decoder of Ho et al. eq. 13, or a density
DECODER_DRAWS = 8  # noise draws of the decoder term an image: its noise is the largest a term
GRID_TOLERANCE = 1e-3  # how far (in levels) a pixel may lie off the 8-bit grid
LOG_2PI = math.log(2.0 * math.pi)

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (mu, logvar), each (B, d)
Decoder = Callable[[Tensor], Tensor]  # z -> x_hat (B, C, H, W)
EpsFnFor = Callable[[Tensor | None, Tensor | None], EpsFn]  # (x_hat, z) -> eps_fn(y_t, t)
LogDensity = Callable[[Tensor], Tensor]  # z (N, d) -> log p(z) (N,)


# --------------------------------------------------------------------------------------------
# Gaussians and the 8-bit decoder
# --------------------------------------------------------------------------------------------

def normal_kl(mean1: Tensor, logvar1: Tensor | float, mean2: Tensor,
              logvar2: Tensor | float) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats:
    (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1) / 2."""
    lv1 = torch.as_tensor(logvar1, dtype=mean1.dtype, device=mean1.device)
    lv2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (lv2 - lv1 + torch.exp(lv1 - lv2) + (mean1 - mean2).square() * torch.exp(-lv2)
                  - 1.0)


def gaussian_log_density(x: Tensor, mean: Tensor, log_scale: Tensor | float) -> Tensor:
    """log N(x; mean, e^(2 log_scale)), elementwise, in nats (a density, for continuous data)."""
    ls = torch.as_tensor(log_scale, dtype=x.dtype, device=x.device)
    return -0.5 * (LOG_2PI + 2.0 * ls + ((x - mean) * torch.exp(-ls)).square())


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - e^-d) for d >= 0, without cancellation (Maechler 2012: two branches at ln 2)."""
    return torch.where(d < math.log(2.0), torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d)))


def log_normal_cdf_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b (either may be infinite), accurate in both tails.

    An interval lying mostly above 0 is reflected, Phi(b) - Phi(a) = Phi(-a) - Phi(-b), so that
    its upper end is never far in the upper tail; then
    log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))), with log Phi
    from `torch.special.log_ndtr`, which stays exact deep in the lower tail.
    """
    flip = (a + b) > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_hi + _log1mexp(log_hi - log_lo)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor,
                                        log_scale: Tensor | float) -> Tensor:
    """log P(x) of 8-bit pixels under N(mean, e^(2 log_scale)) cut into 256 bins (Ho et al.
    2020, eq. 13), elementwise, in nats.

    Pixel x in [-1, 1] is level k = round(127.5 (x + 1)) of 0..255, the bin
    [(k - 1/2) / 127.5 - 1, (k + 1/2) / 127.5 - 1] (width 2/255 around k / 127.5 - 1), except
    that the first bin reaches down to -inf and the last up to +inf: the probabilities of the
    256 levels sum to 1. Neighbouring bins share their edge to the last bit (the same
    arithmetic on the same half-integer), so no mass is lost between them in float32.
    """
    ls = torch.as_tensor(log_scale, dtype=x.dtype, device=x.device)
    k = torch.round((x + 1.0) * 127.5).clamp(0, 255)
    inf = torch.full_like(k, math.inf)
    lower = torch.where(k > 0, (k - 0.5) / 127.5 - 1.0, -inf)
    upper = torch.where(k < 255, (k + 0.5) / 127.5 - 1.0, inf)
    inv_scale = torch.exp(-ls)
    return log_normal_cdf_diff((lower - mean) * inv_scale, (upper - mean) * inv_scale)


# --------------------------------------------------------------------------------------------
# The terms of L_diff (code indices: step t = 0..T-1; t = 0 is the paper's y_1)
# --------------------------------------------------------------------------------------------

def model_log_variance(schedule: Schedule, var_type: str = "fixedlarge") -> Tensor:
    """log sigma_t^2 of the reverse step p_theta(y_{t-1} | y_t), t = 0..T-1, float64 (T,).

    ``fixedsmall``: the posterior variance beta_tilde_t. ``fixedlarge``: beta_t. At t = 0 both
    use beta_tilde at index 1 (beta_tilde_0 = 0), as improved-diffusion and `samplers.ddpm` do:
    the decoder's scale is sqrt(beta_tilde_1) for either choice.
    """
    check_choice("var_type", var_type, names.VAR_TYPES)
    if var_type == "fixedsmall":
        return schedule.posterior_log_variance_clipped
    return torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]).log()


def _per_image(x: Tensor) -> Tensor:
    """Sum over all but the batch axis, then float64 on the CPU (sums in x's dtype: MPS has no
    float64)."""
    return x.flatten(1).sum(1).cpu().double()


def prior_term(schedule: Schedule, y0: Tensor) -> Tensor:
    """KL(q(y_T | y0) || N(0, I)) per image (B,), nats: q(y_T|y0) = N(sqrt(ab_T) y0, 1 - ab_T),
    so per pixel (ab_T y0^2 + (1 - ab_T) - 1 - log(1 - ab_T)) / 2."""
    ab = float(schedule.alpha_bar[-1])
    const = 0.5 * (-ab - math.log1p(-ab))  # the variance part, the same for every pixel
    return 0.5 * ab * _per_image(y0.square()) + const * y0[0].numel()


def step_kl(schedule: Schedule, t: Tensor, eps: Tensor, eps_pred: Tensor,
            var_type: str = "fixedlarge") -> Tensor:
    """KL(q(y_{t-1} | y_t, y0) || p_theta(y_{t-1} | y_t)) per image (B,), nats, at steps t >= 1
    (LongTensor (B,)) with y_t = q_sample(y0, t, eps) and eps_pred = eps_theta(y_t, t).

    Both are Gaussians: the posterior N(mu_tilde, beta_tilde_t), the model N(mu_theta,
    sigma_t^2) with mu_theta the posterior mean at the predicted y0. Their means differ by
    mu_tilde - mu_theta = beta_t / sqrt(alpha_t (1 - ab_t)) (eps_pred - eps) (DDPM eq. 12), so
    with D pixels

        KL = D/2 (log(sigma_t^2 / beta_tilde_t) + beta_tilde_t / sigma_t^2 - 1)
             + beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) ||eps - eps_pred||^2.
    """
    t = t.detach().cpu().long()
    if bool((t < 1).any()) or bool((t >= schedule.T).any()):
        raise ConfigError(f"step_kl takes steps t in 1..{schedule.T - 1}; got {t.tolist()}")
    log_var = model_log_variance(schedule, var_type)[t]
    post_var = schedule.posterior_variance[t]
    ratio = post_var / log_var.exp()
    const = 0.5 * (log_var - post_var.log() + ratio - 1.0)
    coef = schedule.betas[t].square() / (
        2.0 * log_var.exp() * schedule.alphas[t] * (1.0 - schedule.alpha_bar[t]))
    return const * eps[0].numel() + coef * _per_image((eps - eps_pred.to(eps.dtype)).square())


def decoder_nll(schedule: Schedule, x0: Tensor, mean: Tensor, var_type: str = "fixedlarge",
                decoder: str = "discrete") -> Tensor:
    """-log p_theta(x0 | y_1) per image (B,), nats: the discretized Gaussian over 256 levels
    (or, with ``decoder="continuous"``, the Gaussian density) around ``mean``, the model's mean
    read back to the image (`Formulation.readback` of the predicted y0), with the scale of step
    0 (`model_log_variance`)."""
    check_choice("decoder", decoder, DECODERS)
    log_scale = 0.5 * float(model_log_variance(schedule, var_type)[0])
    mean = mean.to(x0.dtype)
    if decoder == "discrete":
        return -_per_image(discretized_gaussian_log_likelihood(x0, mean, log_scale))
    return -_per_image(gaussian_log_density(x0, mean, log_scale))


# --------------------------------------------------------------------------------------------
# The estimator of L_diff: stratified timesteps, or every timestep
# --------------------------------------------------------------------------------------------

def strata_bounds(T: int, strata: int) -> tuple[Tensor, Tensor]:
    """The first step and the size n_k of each of S = ``strata`` contiguous strata of the steps
    1..T-1, near a geometric sequence: with N = T - 1 and edges e_0 = 0 < e_1 < ... < e_S = N
    (stratum k holds the steps e_{k-1} + 1 .. e_k), each edge is the next term of the
    geometric sequence from e_{k-1} + 1 to N + 1 in the S - k + 1 strata left,

        e_k = min(N - (S - k), max(e_{k-1} + 1, round(a ((N + 1) / a)^(1 / (S - k + 1))) - 1)),
        a = e_{k-1} + 1,

    at least one step a stratum. So the strata are equal in log t where integers allow: single
    steps at the start, where the terms are largest and fall fastest (about as 1/t), wide ones
    at the end, where they are small (docs/likelihood.md#estimator)."""
    N = T - 1
    edges = [0]
    for k in range(1, strata + 1):
        a = edges[-1] + 1
        geometric = round(a * ((N + 1) / a) ** (1 / (strata - k + 1))) - 1
        edges.append(min(N - (strata - k), max(a, geometric)))
    e = torch.tensor(edges)
    return 1 + e[:-1], e[1:] - e[:-1]


def stratum_of_draws(draws: int) -> Tensor:
    """The stratum of each of K = ``draws`` timesteps an image: S = max(1, K // 2) strata of two
    draws each, the last taking three when K is odd (K = 1: one stratum, one draw). Draw j
    belongs to stratum min(j // 2, S - 1), (K,) LongTensor."""
    return (torch.arange(draws) // 2).clamp(max=max(1, draws // 2) - 1)


def within_strata_variance(values: Tensor, owner: Tensor, sizes: Tensor) -> Tensor:
    """An unbiased estimate of Var(sum_k n_k mean_j Y_kj) from m_k >= 2 independent draws Y_kj
    in each stratum k (``values`` (B, K), draw j in stratum ``owner[j]`` of ``sizes`` n_k):

        v = sum_k n_k^2 s_k^2 / m_k,   s_k^2 = sum_j (Y_kj - mean_k Y)^2 / (m_k - 1)

    (a pair: n_k^2 (Y_k1 - Y_k2)^2 / 4). A stratum of one draw gives nan."""
    B, S = values.shape[0], len(sizes)
    counts = torch.bincount(owner, minlength=S).to(values.dtype)
    mean = torch.zeros(B, S, dtype=values.dtype).index_add_(1, owner, values) / counts
    dev2 = torch.zeros(B, S, dtype=values.dtype).index_add_(
        1, owner, (values - mean[:, owner]).square())
    return (sizes.to(values.dtype).square() * dev2 / ((counts - 1) * counts)).sum(1)


def collapsed_variance(x: Tensor) -> Tensor:
    """An estimate of Var(sum_k x_k) from one draw x_k = n_k Y_k per stratum (B, K) -> (B,),
    for the exact sum (one draw at each step).

    One draw per stratum says nothing of a stratum's own spread, so neighbouring strata are
    collapsed into groups g (pairs; the last three when K is odd) and each group is treated as
    one stratum with m_g draws (Cochran 1977, sec. 5A.12):

        v = sum_g m_g / (m_g - 1) sum_{k in g} (x_k - mean_g x)^2       (a pair: (x_1 - x_2)^2)

    E[v] = Var + sum_g m_g / (m_g - 1) sum_{k in g} (E x_k - mean_g E x)^2 >= Var: it is
    conservative by how much neighbouring strata's means differ. K = 1 gives nan.
    """
    B, K = x.shape
    if K < 2:
        return torch.full((B,), math.nan, dtype=x.dtype)
    pairs = K // 2 - K % 2  # the pairs before a final group of three when K is odd
    head = x[:, :2 * pairs].reshape(B, pairs, 2)
    v = (head[..., 0] - head[..., 1]).square().sum(1)
    if K % 2:
        tail = x[:, 2 * pairs:]
        v = v + 1.5 * (tail - tail.mean(1, keepdim=True)).square().sum(1)
    return v


@dataclass(frozen=True)
class DiffusionTerms:
    """-L_diff of each image (B,) in its parts, nats, float64 on the CPU, with standard errors.

    ``prior``: KL(q(y_T|y0) || N(0, I)), closed form. ``steps``: the estimate of the sum of the
    T - 1 step KLs. ``decoder``: -log p_theta(x0 | y_1), the mean of DECODER_DRAWS noise draws.
    """

    prior: Tensor
    steps: Tensor
    steps_se: Tensor
    decoder: Tensor
    decoder_se: Tensor

    @property
    def nll(self) -> Tensor:
        """-L_diff per image: prior + steps + decoder."""
        return self.prior + self.steps + self.decoder


def _predict(eps_fn: EpsFn, y_t: Tensor, t: Tensor) -> Tensor:
    eps = eps_fn(y_t, t)
    if tuple(eps.shape) != tuple(y_t.shape):
        raise ConfigError(f"eps_fn must return noise shaped like y_t {tuple(y_t.shape)}; got "
                          f"{tuple(eps.shape)}")
    return eps.to(y_t.dtype)


def step_terms(eps_fn: EpsFn, schedule: Schedule, y0: Tensor, t: Tensor,
               generators: Sequence[torch.Generator], var_type: str = "fixedlarge") -> Tensor:
    """KL_{t_j}(eps_j) of each image and column j of the steps ``t`` (B, K), nats (B, K): one
    eps_j from each image's generator a column, in column order, y_t = q_sample(y0, t_j, eps_j)
    and `step_kl` with eps_fn(y_t, t_j). One network call a column."""
    shape, device, dtype = y0.shape[1:], y0.device, y0.dtype
    kl = []
    for k in range(t.shape[1]):
        eps = randn_like_per_sample(generators, shape, device, dtype)
        t_k = t[:, k].to(device)
        y_t = q_sample(schedule, y0, t_k, eps)
        kl.append(step_kl(schedule, t_k, eps, _predict(eps_fn, y_t, t_k), var_type))
    return torch.stack(kl, 1)


def diffusion_terms(eps_fn: EpsFn, schedule: Schedule, form: Formulation, x0: Tensor,
                    x_hat: Tensor | None = None, *, generators: Sequence[torch.Generator],
                    strata: int = 100, exact: bool = False, var_type: str = "fixedlarge",
                    decoder: str = "discrete") -> DiffusionTerms:
    """Estimate -L_diff(x0; x_hat) per image, in ``form``'s coordinate y0 = form.target(x0).

    ``eps_fn(y_t, t)``: the noise predictor in y (`diffusion.make_eps_fn`), called with steps
    t (B,) of ``schedule``. The step indices 1..T-1 (the paper's t = 2..T) are cut into
    S = K // 2 contiguous strata (`strata_bounds`: single steps at the start, wider ones
    further on) for K = ``strata`` draws an image, two in each stratum (three in the last when
    K is odd; `stratum_of_draws`). Image b draws each t_j uniformly in its stratum k(j) and one
    eps_j, and

        steps = sum_j n_k(j) / m_k(j) KL_{t_j}(eps_j),

    unbiased for sum_t E_eps KL_t, with the unbiased standard error of `within_strata_variance`
    (K = 1: nan). ``exact=True`` takes every step once instead (K = T - 1 draws, strata of one
    step each; T - 1 network calls for the batch, plus two for the decoder), still a Monte Carlo
    estimate over eps, its standard error `collapsed_variance`'s (conservative). The decoder
    term is the mean of DECODER_DRAWS draws, its standard error their standard deviation over
    the root of their number.

    Image b's draws come from ``generators[b]`` in this order: the K uniforms (float64), the
    DECODER_DRAWS decoder noises, then eps_1..eps_K; each drawn alone, so the batch never
    changes them.
    """
    check_schedule(schedule)
    K = schedule.T - 1 if exact else check_strata(strata, schedule.T)
    check_choice("var_type", var_type, names.VAR_TYPES)
    check_batch(x0, x_hat, generators, form, decoder)
    B, shape, device, dtype = x0.shape[0], x0.shape[1:], x0.device, x0.dtype
    owner = torch.arange(K) if exact else stratum_of_draws(K)
    starts, sizes = strata_bounds(schedule.T, K if exact else int(owner[-1]) + 1)
    u = torch.stack([torch.rand(K, generator=g, device=g.device, dtype=torch.float64).cpu()
                     for g in generators])
    first, n = starts[owner], sizes[owner]
    t = (first + (u * n).floor().long()).clamp(max=first + n - 1)  # (B, K)
    y0 = form.target(x0, x_hat)

    zero = torch.zeros(B, dtype=torch.long, device=device)
    dec = []
    for _ in range(DECODER_DRAWS):
        y_1 = q_sample(schedule, y0, 0, randn_like_per_sample(generators, shape, device, dtype))
        y0_pred = predict_y0(schedule, y_1, 0, _predict(eps_fn, y_1, zero))
        dec.append(decoder_nll(schedule, x0, form.readback(y0_pred, x_hat), var_type, decoder))
    dec = torch.stack(dec, 1)  # (B, DECODER_DRAWS)

    kl = step_terms(eps_fn, schedule, y0, t, generators, var_type)  # (B, K): KL_{t_j}(eps_j)
    weight = n.double() / torch.bincount(owner)[owner].double()  # n_k / m_k of each draw
    variance = (collapsed_variance(kl * sizes.double()) if exact
                else within_strata_variance(kl, owner, sizes))
    return DiffusionTerms(prior=prior_term(schedule, y0), steps=(kl * weight).sum(1),
                          steps_se=variance.sqrt(), decoder=dec.mean(1),
                          decoder_se=dec.std(1) / math.sqrt(DECODER_DRAWS))


# --------------------------------------------------------------------------------------------
# The rate: KL(q(z|x0) || p(z))
# --------------------------------------------------------------------------------------------

def normal_rate(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag e^logvar) || N(0, I)) per row (B,), nats, closed form:
    sum_j (mu_j^2 + e^logvar_j - 1 - logvar_j) / 2."""
    mu, logvar = mu.cpu().double(), logvar.cpu().double()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


def normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) per row (B,), nats, float64 on the CPU."""
    z = z.cpu().double()
    return -0.5 * (z.square().sum(1) + z.shape[1] * LOG_2PI)


def monte_carlo_rate(mu: Tensor, logvar: Tensor, log_prior: LogDensity,
                     noise: Tensor) -> tuple[Tensor, Tensor]:
    """E_q[log q(z|x0) - log p(z)] per row and its standard error, from M draws
    z_m = mu + e^(logvar/2) noise_m (noise (B, M, d)): the mean of the M values, and their
    standard deviation (M - 1 in the denominator) over sqrt(M). For any prior density,
    e.g. the Ex-PDE mixture's `GaussianMixture.log_prob`."""
    mu, logvar, noise = mu.cpu().double(), logvar.cpu().double(), noise.cpu().double()
    B, M, d = noise.shape
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * noise  # (B, M, d)
    log_q = -0.5 * (LOG_2PI + logvar[:, None] + noise.square()).sum(2)  # (B, M)
    log_p = log_prior(z.reshape(B * M, d)).cpu().double().reshape(B, M)
    values = log_q - log_p
    return values.mean(1), values.std(1) / math.sqrt(M)


# --------------------------------------------------------------------------------------------
# The whole bound of a batch
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LikelihoodBound:
    """The bound of each image (B,), in parts that are costs in nats (float64, CPU):

        -bound = rate + prior + steps + decoder,    bits/dim = -bound / (dims ln 2)

    ``rate``: KL(q(z|x0) || p(z)) (0 without a VAE); ``prior``, ``steps``, ``decoder``: the
    parts of -L_diff (`DiffusionTerms`). Each estimated part has its standard error (``*_se``,
    0 where closed form); they are independent, so ``se`` adds them in quadrature. It is the
    error given the image's one draw of z: the spread of L_diff over z ~ q(z|x0) is not in it
    (it is in the spread over images, `summarize`'s ``se_images``). ``log_prior_z``: log p(z)
    of that z (None without a VAE). ``dims``: C H W.
    """

    rate: Tensor
    rate_se: Tensor
    prior: Tensor
    steps: Tensor
    steps_se: Tensor
    decoder: Tensor
    decoder_se: Tensor
    log_prior_z: Tensor | None
    dims: int

    PARTS = ("rate", "prior", "steps", "decoder")

    @property
    def nats(self) -> Tensor:
        """-bound per image, nats: an upper bound on -log p(x0) (in expectation)."""
        return self.rate + self.prior + self.steps + self.decoder

    @property
    def bound(self) -> Tensor:
        """The lower bound on log p(x0) per image, nats."""
        return -self.nats

    @property
    def se(self) -> Tensor:
        """Standard error of ``nats`` per image (given its z)."""
        return (self.rate_se.square() + self.steps_se.square() + self.decoder_se.square()).sqrt()

    @property
    def bits_per_dim(self) -> Tensor:
        return self.nats / (self.dims * math.log(2.0))

    @property
    def bits_per_dim_se(self) -> Tensor:
        return self.se / (self.dims * math.log(2.0))

    def parts_bits_per_dim(self) -> dict[str, Tensor]:
        """Each part in bits per dimension; they sum to ``bits_per_dim``."""
        return {p: getattr(self, p) / (self.dims * math.log(2.0)) for p in self.PARTS}

    @classmethod
    def cat(cls, parts: Sequence["LikelihoodBound"]) -> "LikelihoodBound":
        """The bounds of several batches as one, in order."""
        if not parts:
            raise ConfigError("LikelihoodBound.cat needs at least one batch")
        out = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            out[f.name] = values[0] if f.name == "dims" or values[0] is None else torch.cat(values)
        return cls(**out)


def likelihood_bound(x0: Tensor, schedule: Schedule, form: Formulation, eps_fn_for: EpsFnFor,
                     *, encode: Encoder | None = None, decode: Decoder | None = None,
                     log_prior: LogDensity | None = None, seed: int = 0, first_index: int = 0,
                     strata: int = 100, exact: bool = False, var_type: str = "fixedlarge",
                     decoder: str = "discrete", rate_samples: int = 16) -> LikelihoodBound:
    """The bound on log p(x0) of a batch of 8-bit images x0 (B, C, H, W) in [-1, 1].

    With a VAE (``form`` conditioned): (mu, logvar) = encode(x0), one z = mu + sigma eps_z per
    image, x_hat = decode(z) (the caller's decode, clamped as in training), and
    -L_diff(x0; x_hat) by `diffusion_terms` with the predictor eps_fn_for(x_hat, z). The rate
    is closed form for p(z) = N(0, I) (``log_prior`` None) or `monte_carlo_rate` with
    ``rate_samples`` draws for any other density (the Ex-PDE mixture's ``log_prob``).
    Without a VAE (``uncond``): eps_fn_for(None, None), rate 0: the plain DDPM bound.

    Image b draws from the generator of (seed, first_index + b) (`rng.sample_generators`):
    eps_z, then those of `diffusion_terms`, then the rate's (last, so that the prior changes
    the rate only: two priors' bounds of an image differ by their rates alone).
    """
    check_batch(x0, None, None, form, decoder)
    if form.conditioned != (encode is not None and decode is not None):
        raise ConfigError(f"formulation {form.name!r} "
                          + ("needs encode and decode (the VAE)" if form.conditioned
                             else "has no VAE; pass encode=None and decode=None"))
    if log_prior is not None and not form.conditioned:
        raise ConfigError(f"formulation {form.name!r} has no latent z; pass log_prior=None")
    if log_prior is not None and (isinstance(rate_samples, bool) or not isinstance(
            rate_samples, int) or rate_samples < 2):
        raise ConfigError(f"rate_samples must be an integer >= 2 (a standard error needs two "
                          f"draws); got {rate_samples!r}")
    B = x0.shape[0]
    gens = sample_generators(seed, range(first_index, first_index + B))
    zeros = torch.zeros(B, dtype=torch.float64)
    rate, rate_se, log_pz, x_hat, z = zeros, zeros, None, None, None
    if form.conditioned:
        mu, logvar = encode(x0)
        z = mu + torch.exp(0.5 * logvar) * randn_like_per_sample(gens, mu.shape[1:], mu.device,
                                                                 mu.dtype)
        x_hat = decode(z)
    terms = diffusion_terms(eps_fn_for(x_hat, z), schedule, form, x0, x_hat, generators=gens,
                            strata=strata, exact=exact, var_type=var_type, decoder=decoder)
    if form.conditioned and log_prior is None:
        rate, log_pz = normal_rate(mu, logvar), normal_log_density(z)
    elif form.conditioned:
        noise = randn_like_per_sample(gens, (rate_samples, mu.shape[1]), "cpu", torch.float64)
        rate, rate_se = monte_carlo_rate(mu, logvar, log_prior, noise)
        log_pz = log_prior(z).cpu().double()
    return LikelihoodBound(rate=rate, rate_se=rate_se, prior=terms.prior, steps=terms.steps,
                           steps_se=terms.steps_se, decoder=terms.decoder,
                           decoder_se=terms.decoder_se, log_prior_z=log_pz,
                           dims=x0[0].numel())


def summarize(bound: LikelihoodBound) -> dict[str, float]:
    """The mean bits/dim of N images with two standard errors, and each part's mean.

    ``se_images``: the standard deviation of the per-image bits/dim over sqrt(N), the error of
    the mean as an estimate of the data's expected bound (images, z, timesteps and noise all
    vary; the per-image estimates are independent and unbiased). ``se_estimator``:
    sqrt(sum_b se_b^2) / N, the Monte Carlo error of the mean for these very images (given
    their z draws). nan where N < 2.
    """
    bpd, n = bound.bits_per_dim, len(bound.nats)
    out = {"images": n, "bits_per_dim": float(bpd.mean()),
           "se_images": float(bpd.std() / math.sqrt(n)) if n > 1 else math.nan,
           "se_estimator": float(bound.bits_per_dim_se.square().sum().sqrt() / n),
           "nats": float(bound.nats.mean())}
    out.update({f"{p}_bits_per_dim": float(v.mean())
                for p, v in bound.parts_bits_per_dim().items()})
    return out


# --------------------------------------------------------------------------------------------
# Checks of the arguments (ConfigError, naming the argument)
# --------------------------------------------------------------------------------------------

def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_schedule(schedule: Schedule) -> None:
    if schedule.T < 2:
        raise ConfigError(f"the bound needs a schedule of T >= 2 steps; got T = {schedule.T}")


def check_strata(strata: object, T: int) -> int:
    """``strata`` as an int in 1..T-1 (there are T - 1 steps to stratify)."""
    if isinstance(strata, bool) or not isinstance(strata, int) or not 1 <= strata <= T - 1:
        raise ConfigError(f"strata must be an integer in 1..{T - 1} (T - 1 steps); got "
                          f"{strata!r}")
    return strata


def check_images(x0: object, name: str = "x0", decoder: str = "discrete") -> None:
    """A finite floating-point batch (B, C, H, W) in [-1, 1]; on the 8-bit grid k / 127.5 - 1
    (within GRID_TOLERANCE of a level) for the discrete decoder."""
    if not isinstance(x0, Tensor) or x0.ndim != 4 or x0.shape[0] == 0 or \
            not x0.is_floating_point():
        what = (f"{x0.dtype} of shape {tuple(x0.shape)}" if isinstance(x0, Tensor)
                else type(x0).__name__)
        raise ConfigError(f"{name} must be a floating-point batch of images (B, C, H, W) with "
                          f"B >= 1; got {what}")
    if not bool(torch.isfinite(x0).all()):
        raise ConfigError(f"{name} holds nan or inf; only finite images have a likelihood")
    lo, hi = float(x0.min()), float(x0.max())
    if lo < -1.0 or hi > 1.0:
        raise ConfigError(f"{name} must lie in [-1, 1] (8-bit images as k / 127.5 - 1); its "
                          f"values span [{lo:.4g}, {hi:.4g}]")
    if decoder == "discrete":
        levels = (x0.double() + 1.0) * 127.5
        off = float((levels - levels.round()).abs().max())
        if off > GRID_TOLERANCE:
            raise ConfigError(f"{name} is not 8-bit: a pixel lies {off:.3g} levels off the grid "
                              "k / 127.5 - 1 that the discrete decoder scores; quantize the "
                              "images to 8 bits first, or use decoder='continuous'")


def check_batch(x0: Tensor, x_hat: Tensor | None, generators: Sequence | None,
                form: Formulation, decoder: str = "discrete") -> None:
    """The images (`check_images`), x_hat shaped like them where ``form`` needs one, and one
    generator per image (when given)."""
    check_choice("decoder", decoder, DECODERS)
    check_images(x0, "x0", decoder)
    if form.conditioned and x_hat is not None and tuple(x_hat.shape) != tuple(x0.shape):
        raise ConfigError(f"x_hat must be shaped like x0 {tuple(x0.shape)}; got "
                          f"{tuple(x_hat.shape)}")
    if generators is not None:
        if form.conditioned and x_hat is None:
            raise ConfigError(f"formulation {form.name!r} is conditioned on x_hat; pass x_hat")
        if len(generators) != x0.shape[0]:
            raise ConfigError(f"generators must hold one generator per image: {x0.shape[0]} "
                              f"images, {len(generators)} generators")
