"""Samplers: exact oracle on Gaussian data, determinism, clipping, callback, pinned values."""

from __future__ import annotations

import pytest
import torch

from diffusevae.core.diffusion import (FORMULATIONS, get_formulation, make_eps_fn,
                                       predict_eps, predict_y0, q_posterior, respaced_timesteps)
from diffusevae.rng import randn_like_per_sample, sample_generators
from diffusevae.core.samplers import (SAMPLERS, ddim, ddpm, dpmpp_2m, dpmpp_3m, get_sampler,
                                      unipc)
from oracles import MU, N, SCHEDULE, SIGMA, X_HAT, oracle_model


def dummy_eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic per-sample noise predictor."""
    return torch.tanh(y) * (t.to(y.dtype) / 1000).reshape(-1, 1, 1, 1) + 0.05


SHAPE = (1, 4, 4)

# (sampler, steps, spacing, options, allowance). The allowance is the sampler's own
# discretisation error on these data, measured with 10^5 samples: DDPM with 1000 steps is within
# noise; DDIM with 50 steps shrinks the covariance by <= 0.025 (eta = 0) and <= 0.047 (eta = 1),
# an O(1/S) error that falls to 0.007 and 0.014 at 200 steps. DPM-Solver++(2M) with 20 trailing
# steps: 0.023 (exactly, `exact_moments`; 0.0035 at 40, 0.0028 at 50). Tolerance = 5 standard
# errors + the allowance. DPM-Solver++ runs on `trailing` here because on `uniform` its step into
# tau = 0 is long in lambda (h = 2.9 after 0.67 at 20 steps) and the extrapolation there costs
# accuracy: 0.107 at 20 uniform steps, 0.025 at 50 (see test_dpmpp_2m_accuracy).
ORACLE_CASES = [
    ("ddpm", 1000, "uniform", {"var_type": "fixedsmall"}, 0.005),
    ("ddpm", 1000, "uniform", {"var_type": "fixedlarge"}, 0.005),
    ("ddim", 50, "uniform", {"eta": 0.0}, 0.035),
    ("ddim", 50, "uniform", {"eta": 1.0}, 0.06),
    ("dpmpp_2m", 20, "trailing", {}, 0.03),
    ("dpmpp_3m", 20, "trailing", {}, 0.03),
    ("unipc", 20, "trailing", {}, 0.03),
]


@pytest.mark.parametrize("form_name", list(FORMULATIONS))
@pytest.mark.parametrize("sampler,steps,spacing,options,allowance", ORACLE_CASES)
def test_oracle_sampler_reproduces_gaussian_data(form_name, sampler, steps, spacing, options,
                                                 allowance):
    form = get_formulation(form_name)
    x_hat = X_HAT.reshape(1, 1, 2, 2).expand(N, 1, 2, 2) if form.conditioned else None
    eps_fn = make_eps_fn(oracle_model(form_name, form.conditioned), form, x_hat)
    g = torch.Generator().manual_seed(1234)
    y_T = torch.randn(N, 1, 2, 2, generator=g, dtype=torch.float64)
    y0 = get_sampler(sampler)(eps_fn, y_T, SCHEDULE, respaced_timesteps(1000, steps, spacing),
                              generators=g, **options)
    x = form.readback(y0, x_hat).reshape(N, 4)

    mean, cov = x.mean(0), torch.cov(x.T)
    var = SIGMA.diagonal()
    se_mean = (var / N).sqrt()
    se_cov = ((var[:, None] * var[None, :] + SIGMA**2) / N).sqrt()  # Wishart entry std
    assert torch.all((mean - MU).abs() <= 5 * se_mean + 0.01), (mean, MU)
    assert torch.all((cov - SIGMA).abs() <= 5 * se_cov + allowance), (cov - SIGMA)


def exact_moments(sampler: str, steps: int, spacing: str, form_name: str = "form2", **options):
    """Exact mean and covariance of a deterministic sampler's images on the oracle, no sampling
    noise: with the exact predictor of Gaussian data every step is affine in y, so the output is
    x = A y_T + b; pushing 0 and the basis vectors through gives b and A, and x ~ N(b, A A^T)."""
    form = get_formulation(form_name)
    x_hat = X_HAT.reshape(1, 1, 2, 2).expand(5, 1, 2, 2) if form.conditioned else None
    eps_fn = make_eps_fn(oracle_model(form_name, form.conditioned), form, x_hat)
    y_T = torch.cat([torch.zeros(1, 4), torch.eye(4)]).to(torch.float64).reshape(5, 1, 2, 2)
    y0 = get_sampler(sampler)(eps_fn, y_T, SCHEDULE, respaced_timesteps(1000, steps, spacing),
                              **options)
    x = form.readback(y0, x_hat).reshape(5, 4)
    A = (x[1:] - x[0]).T
    return x[0], A @ A.T


def cov_error(sampler: str, steps: int, spacing: str, **options) -> float:
    return (exact_moments(sampler, steps, spacing, **options)[1] - SIGMA).abs().max().item()


def test_dpmpp_2m_accuracy():
    """DPM-Solver++(2M) is second order: 20 steps beat DDIM's 50, and doubling the steps cuts the
    error by more than 4 (measured 6.6; a wrong r, r = 1 or a first-order second-to-last step give
    2.7 to 3.4, and errors of 0.032 to 0.040 at 20 steps). Exact moments: no sampling noise."""
    dpm20, dpm40 = cov_error("dpmpp_2m", 20, "trailing"), cov_error("dpmpp_2m", 40, "trailing")
    assert dpm20 < cov_error("ddim", 50, "trailing", eta=0.0)  # 0.0228 < 0.0249
    assert dpm20 / dpm40 > 4, (dpm20, dpm40)
    assert dpm40 < 0.005, dpm40  # 0.0035
    assert cov_error("dpmpp_2m", 40, "quad") < cov_error("ddim", 100, "quad", eta=0.0)
    # On uniform spacing the long last step into tau = 0 (see ORACLE_CASES) keeps it behind DDIM
    # until about 50 steps; pinned so that a change there is seen, not to endorse it.
    assert cov_error("dpmpp_2m", 20, "uniform") == pytest.approx(0.10709, abs=1e-4)
    assert cov_error("dpmpp_2m", 50, "uniform") == pytest.approx(0.02544, abs=1e-4)
    for form_name in FORMULATIONS:  # every formulation sees the same y-dynamics
        mean, cov = exact_moments("dpmpp_2m", 20, "trailing", form_name)
        assert (mean - MU).abs().max() < 0.002 and (cov - SIGMA).abs().max() < 0.024, form_name


def test_dpmpp_3m_is_2m_where_it_lacks_predictions_and_third_order_after():
    """Up to four steps DPM-Solver++(3M) has no step that is both third and not among the last
    two, so it is (2M) exactly; from five on its middle steps use the second difference.
    Third order is no better on the oracle, whose error comes from the last, low-order steps
    (measured, exact moments: 0.0204 against 2M's 0.0228 at 20 trailing steps, 0.0046 against
    0.0035 at 40; 0.0153 against 0.0254 at 50 uniform): pinned so that a change is seen."""
    y_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 2, 3, 4):
        taus = respaced_timesteps(1000, steps, "trailing")
        a, b = dpmpp_3m(dummy_eps, y_T, SCHEDULE, taus), dpmpp_2m(dummy_eps, y_T, SCHEDULE, taus)
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12), (steps, (a - b).abs().max())
    taus = respaced_timesteps(1000, 10, "trailing")
    assert (dpmpp_3m(dummy_eps, y_T, SCHEDULE, taus)
            - dpmpp_2m(dummy_eps, y_T, SCHEDULE, taus)).abs().max() > 0.1
    assert cov_error("dpmpp_3m", 20, "trailing") == pytest.approx(0.020441, abs=1e-5)
    assert cov_error("dpmpp_3m", 40, "trailing") == pytest.approx(0.004611, abs=1e-5)
    assert cov_error("dpmpp_3m", 50, "uniform") == pytest.approx(0.015276, abs=1e-5)


@pytest.mark.parametrize("order,steps", [(2, 6), (2, 10), (3, 6), (3, 10), (3, 14)])
def test_dpmpp_multistep_matches_diffusers(order, steps):
    """DPM-Solver++(2M) and (3M) step for step as diffusers' DPMSolverMultistepScheduler
    (solver_order 2 or 3, dpmsolver++, lower_order_final, final sigma zero) on the same betas
    and timesteps, to its float32 rounding (diffusers keeps alphas_cumprod in float32: 2M and
    3M differ from it alike, by <= 8e-5 here, while 3M and 2M differ by 0.7 at 10 steps)."""
    diffusers = pytest.importorskip("diffusers")
    taus = respaced_timesteps(1000, steps, "trailing")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=SCHEDULE.betas.numpy(), solver_order=order,
        algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=taus.flip(0).tolist())
    y_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = y_T.clone()
    for t in scheduler.timesteps:
        y = scheduler.step(dummy_eps(y, torch.full((2,), int(t))), t, y).prev_sample
    ours = (dpmpp_2m if order == 2 else dpmpp_3m)(dummy_eps, y_T, SCHEDULE, taus)
    assert (ours - y).abs().max() < 2e-4, (ours - y).abs().max()


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 25])
def test_unipc_matches_diffusers(steps):
    """UniPC (bh2, second order, data prediction) step for step as diffusers'
    UniPCMultistepScheduler (lower_order_final, final sigma zero, its own trailing spacing, which
    is ours) on the same betas, to its float32 rounding; it is not DPM-Solver++(2M) from three
    steps on (the corrector), and is below."""
    diffusers = pytest.importorskip("diffusers")
    taus = respaced_timesteps(1000, steps, "trailing")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, trained_betas=SCHEDULE.betas.numpy(), solver_order=2,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == taus.flip(0).tolist()
    y_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = y_T.clone()
    for t in scheduler.timesteps:
        y = scheduler.step(dummy_eps(y, torch.full((2,), int(t))), t, y).prev_sample
    ours = unipc(dummy_eps, y_T, SCHEDULE, taus)
    assert (ours - y).abs().max() < 2e-4, (ours - y).abs().max()
    two = dpmpp_2m(dummy_eps, y_T, SCHEDULE, taus)
    assert torch.equal(ours, two) if steps <= 2 else (ours - two).abs().max() > 1e-3


def test_unipc_on_the_oracle():
    """On the oracle (exact moments) UniPC is second order like DPM-Solver++(2M), a little more
    accurate at 10 and 20 trailing steps (0.0748 and 0.0215 against 0.0772 and 0.0228) and at 50
    uniform (0.0227 against 0.0254), a little less at 40 (0.0043 against 0.0035): pinned so that
    a change is seen."""
    assert cov_error("unipc", 10, "trailing") == pytest.approx(0.074792, abs=1e-5)
    assert cov_error("unipc", 20, "trailing") == pytest.approx(0.021473, abs=1e-5)
    assert cov_error("unipc", 40, "trailing") == pytest.approx(0.004278, abs=1e-5)
    assert cov_error("unipc", 50, "uniform") == pytest.approx(0.022705, abs=1e-5)


@pytest.mark.parametrize("steps", [1, 2])
def test_dpmpp_2m_first_order_steps_are_ddim(steps):
    """The first and the last step are first order, i.e. DDIM with eta = 0: with one or two steps
    the whole run is DDIM; with three the middle step is second order and differs."""
    y_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for spacing in ("uniform", "trailing"):
        taus = respaced_timesteps(1000, steps, spacing)
        a, b = dpmpp_2m(dummy_eps, y_T, SCHEDULE, taus), ddim(dummy_eps, y_T, SCHEDULE, taus)
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12), (a - b).abs().max()
        if steps == 1:
            assert torch.equal(a, b)  # both return the prediction itself
    taus = respaced_timesteps(1000, 3, "trailing")
    states = {}
    for name, fn in (("dpm", dpmpp_2m), ("ddim", ddim)):
        states[name] = []
        fn(dummy_eps, y_T, SCHEDULE, taus, callback=lambda i, n, y, y0: states[name].append(y))
    assert torch.allclose(states["dpm"][0], states["ddim"][0], atol=1e-12)  # first order
    assert not torch.allclose(states["dpm"][1], states["ddim"][1], atol=1e-4)  # second order


def test_oracle_respaced_ddpm():
    """DDPM on a respaced chain (100 steps) needs beta'_i, not the original beta_tau."""
    form = get_formulation("form2")
    x_hat = X_HAT.reshape(1, 1, 2, 2).expand(N, 1, 2, 2)
    eps_fn = make_eps_fn(oracle_model("form2", True), form, x_hat)
    g = torch.Generator().manual_seed(99)
    y_T = torch.randn(N, 1, 2, 2, generator=g, dtype=torch.float64)
    for var_type in ("fixedsmall", "fixedlarge"):
        y0 = ddpm(eps_fn, y_T, SCHEDULE, respaced_timesteps(1000, 100, "trailing"),
                  generators=g, var_type=var_type)
        x = form.readback(y0, x_hat).reshape(N, 4)
        var = SIGMA.diagonal()
        se_cov = ((var[:, None] * var[None, :] + SIGMA**2) / N).sqrt()
        assert torch.all((x.mean(0) - MU).abs() <= 5 * (var / N).sqrt() + 0.01)
        assert torch.all((torch.cov(x.T) - SIGMA).abs() <= 5 * se_cov + 0.03), var_type


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    """Song et al. 2021: DDIM with eta = 1 is ancestral DDPM with beta_tilde (fixedsmall)."""
    y_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for spacing in ("uniform", "trailing"):
        taus = respaced_timesteps(1000, 20, spacing)
        a = ddim(dummy_eps, y_T, SCHEDULE, taus, generators=sample_generators(1, range(3)), eta=1.0)
        b = ddpm(dummy_eps, y_T, SCHEDULE, taus, generators=sample_generators(1, range(3)),
                 var_type="fixedsmall")
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (a - b).abs().max()


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_ddpm_step_variance(var_type):
    """The noise added on the respaced chain [0, 500] has variance beta'_1 or beta_tilde'_1."""
    taus = torch.tensor([0, 500])
    sub = SCHEDULE.respace(taus)
    beta = 1 - SCHEDULE.alpha_bar[500] / SCHEDULE.alpha_bar[0]
    expected = beta if var_type == "fixedlarge" else beta * (1 - SCHEDULE.alpha_bar[0]) / (
        1 - SCHEDULE.alpha_bar[500])
    y_T = torch.randn(5000, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    after = []
    ddpm(dummy_eps, y_T, SCHEDULE, taus, generators=torch.Generator().manual_seed(1),
         var_type=var_type, callback=lambda i, n, y, y0: after.append((y, y0)))
    mean, _, _ = q_posterior(sub, after[0][1], y_T, 1)
    var = (after[0][0] - mean).var().item()
    assert var == pytest.approx(expected.item(), rel=0.03)


# --------------------------------------------------------------------------------------------
# Determinism and batch independence
# --------------------------------------------------------------------------------------------

STOCHASTIC = [("ddpm", {"var_type": "fixedlarge"}), ("ddpm", {"var_type": "fixedsmall"}),
              ("ddim", {"eta": 1.0})]
# deterministic samplers too: the seed still draws y_T, and nothing may mix samples
EVERY_SAMPLER = STOCHASTIC + [("ddim", {"eta": 0.0}), ("dpmpp_2m", {}), ("dpmpp_3m", {})]


def _draw(sampler, options, seed, indices, timesteps):
    gens = sample_generators(seed, indices)
    y_T = randn_like_per_sample(gens, SHAPE, "cpu", torch.float32)
    return get_sampler(sampler)(dummy_eps, y_T, SCHEDULE, timesteps, generators=gens, **options)


@pytest.mark.parametrize("sampler,options", EVERY_SAMPLER)
def test_same_generators_same_samples_and_seed_matters(sampler, options):
    taus = respaced_timesteps(1000, 10, "uniform")
    a = _draw(sampler, options, 7, range(4), taus)
    b = _draw(sampler, options, 7, range(4), taus)
    c = _draw(sampler, options, 8, range(4), taus)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler,options", EVERY_SAMPLER)
def test_sample_does_not_depend_on_its_batch(sampler, options):
    taus = respaced_timesteps(1000, 10, "uniform")
    batch = _draw(sampler, options, 3, range(8), taus)
    for i in range(8):
        alone = _draw(sampler, options, 3, [i], taus)
        assert torch.equal(alone[0], batch[i]), i
    # and a batch holding other indices gives other samples
    assert not torch.allclose(_draw(sampler, options, 3, range(8, 16), taus), batch)


def test_wrong_number_of_generators_is_an_error():
    with pytest.raises(ValueError, match="one generator per sample"):
        ddpm(dummy_eps, torch.zeros(3, *SHAPE), SCHEDULE, [0, 500],
             generators=sample_generators(0, range(2)))


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="var_type"):
        ddpm(dummy_eps, torch.zeros(1, *SHAPE), SCHEDULE, [0, 500], var_type="learned")
    with pytest.raises(ValueError, match="eta"):
        ddim(dummy_eps, torch.zeros(1, *SHAPE), SCHEDULE, [0, 500], eta=-1.0)
    with pytest.raises(ValueError, match="ascending"):
        ddim(dummy_eps, torch.zeros(1, *SHAPE), SCHEDULE, [500, 0])
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")
    with pytest.raises(TypeError, match="eta"):  # no silently ignored options
        dpmpp_2m(dummy_eps, torch.zeros(1, *SHAPE), SCHEDULE, [0, 500], eta=0.5)
    with pytest.raises(TypeError, match="eta"):
        dpmpp_3m(dummy_eps, torch.zeros(1, *SHAPE), SCHEDULE, [0, 500], eta=0.5)
    with pytest.raises(TypeError, match="eta"):
        unipc(dummy_eps, torch.zeros(1, *SHAPE), SCHEDULE, [0, 500], eta=0.5)
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc"}


def test_eps_fn_receives_original_timesteps():
    taus = respaced_timesteps(1000, 7, "quad")
    for sampler in (ddpm, ddim, dpmpp_2m, dpmpp_3m, unipc):
        seen = []

        def spy(y, t):
            seen.append(t.clone())
            return dummy_eps(y, t)

        sampler(spy, torch.randn(3, *SHAPE), SCHEDULE, taus)
        assert all(s.dtype == torch.long and s.shape == (3,) for s in seen)
        assert [int(s[0]) for s in seen] == taus.flip(0).tolist()


@pytest.mark.parametrize("sampler", [ddim, dpmpp_2m, dpmpp_3m])
def test_deterministic_samplers_need_no_generator(sampler):
    y_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    taus = respaced_timesteps(1000, 10, "uniform")
    torch.manual_seed(1)
    a = sampler(dummy_eps, y_T, SCHEDULE, taus)
    torch.manual_seed(2)
    assert torch.equal(a, sampler(dummy_eps, y_T, SCHEDULE, taus))
    gens = sample_generators(0, range(2))  # accepted (one signature), and unused
    assert torch.equal(a, sampler(dummy_eps, y_T, SCHEDULE, taus, generators=gens))


# --------------------------------------------------------------------------------------------
# Clipping, callback
# --------------------------------------------------------------------------------------------

def wild_eps(y, t):
    """A predictor whose y0 prediction lies far outside the data range."""
    return torch.full_like(y, -5.0)


@pytest.mark.parametrize("sampler,options", [("ddpm", {"var_type": "fixedlarge"}),
                                             ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}),
                                             ("dpmpp_2m", {})])
def test_clipping_keeps_the_image_in_range_in_data_space(sampler, options):
    form = get_formulation("form2")
    x_hat = torch.full((4, *SHAPE), 0.5)
    y_T = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    taus = respaced_timesteps(1000, 10, "uniform")
    fn = get_sampler(sampler)
    clipped = form.readback(fn(wild_eps, y_T, SCHEDULE, taus, clip_fn=form.clip_fn(x_hat),
                               generators=sample_generators(0, range(4)), **options), x_hat)
    assert clipped.min() >= -1 - 1e-5 and clipped.max() <= 1 + 1e-5
    assert clipped.max() >= 1 - 1e-4  # the bound was reached: clipped in data space, where
    # clipping y0 itself to [-1, 1] would have allowed the image up to 1.5
    unclipped = form.readback(fn(wild_eps, y_T, SCHEDULE, taus,
                                 generators=sample_generators(0, range(4)), **options), x_hat)
    assert unclipped.max() > 2


def test_clipping_rederives_eps_from_the_clipped_prediction():
    """DDIM (eta = 0) must step with eps derived again from the clipped y0, not the raw eps."""
    taus = respaced_timesteps(1000, 3, "uniform")
    sub = SCHEDULE.respace(taus)
    y_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clip = lambda y0: y0.clamp(-1, 1)  # noqa: E731
    states, preds = [y_T], []

    def record(i, n, y, y0):
        states.append(y)
        preds.append(y0)

    ddim(wild_eps, y_T, SCHEDULE, taus, clip_fn=clip, callback=record)
    for k, i in enumerate(reversed(range(3))):
        y, y0c = states[k], preds[k]
        raw_eps = wild_eps(y, None)
        assert torch.equal(y0c, clip(predict_y0(sub, y, i, raw_eps)))
        a_prev = float(sub.alpha_bar_prev[i])
        rederived = a_prev**0.5 * y0c + (1 - a_prev) ** 0.5 * predict_eps(sub, y, i, y0c)
        with_raw = a_prev**0.5 * y0c + (1 - a_prev) ** 0.5 * raw_eps
        assert torch.allclose(states[k + 1], rederived, atol=1e-10)
        if i > 0:
            assert not torch.allclose(states[k + 1], with_raw, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_callback_once_per_step_in_order(sampler):
    calls = []
    taus = respaced_timesteps(1000, 6, "trailing")
    out = get_sampler(sampler)(dummy_eps, torch.randn(2, *SHAPE), SCHEDULE, taus,
                               callback=lambda i, n, y, y0: calls.append((i, n, y, y0)))
    assert [c[0] for c in calls] == list(range(6))
    assert all(c[1] == 6 and c[2].shape == c[3].shape == (2, *SHAPE) for c in calls)
    assert torch.equal(calls[-1][2], out)
    assert torch.equal(calls[-1][3], out)  # the last step lands on the clean prediction


def test_single_step_returns_the_prediction():
    """With one step (abar_prev = 1) every sampler returns y0_pred itself."""
    y_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    taus = torch.tensor([999])
    t = torch.full((2,), 999)
    expected = predict_y0(SCHEDULE.respace(taus), y_T, 0, dummy_eps(y_T, t))
    for sampler in (ddpm, ddim, dpmpp_2m):
        assert torch.allclose(sampler(dummy_eps, y_T, SCHEDULE, taus), expected, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Pinned reference values (diffusers style): catch any change to the loops' arithmetic.
# Recorded after the oracle tests above passed.
# --------------------------------------------------------------------------------------------

def pinned_eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * y + 0.01 * (t.to(y.dtype) / 1000).reshape(-1, 1, 1, 1)


# (sum, mean |y0|) of the output; ddim eta=1 equals ddpm fixedsmall, as it should. The
# stochastic ones draw from sample_generators(0, ...): re-recorded when rng.generator replaced
# manual_seed's 32-bit seeding (the noise changed, not the arithmetic; the two still agree).
PINNED = {
    ("ddim", "eta=0"): (-368.060979022808, 35.75618541923476),
    ("ddim", "eta=1"): (-267.61439168617346, 28.78251533997728),
    ("ddpm", "fixedlarge"): (-266.60576868029176, 28.659194626594417),
    ("ddpm", "fixedsmall"): (-267.6143916861736, 28.782515339977294),
    ("dpmpp_2m", "-"): (-334.0006134505181, 32.48691347677441),  # it takes no options
    ("dpmpp_3m", "-"): (-338.00330580620255, 32.868423299631026),
    ("unipc", "-"): (-331.0119046447921, 32.20146709344357),
}


@pytest.mark.parametrize("key", list(PINNED))
def test_pinned_reference_values(key):
    sampler, option = key
    options = ({"eta": float(option[-1])} if sampler == "ddim" else
               {"var_type": option} if sampler == "ddpm" else {})
    y_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = get_sampler(sampler)(pinned_eps, y_T, SCHEDULE, respaced_timesteps(1000, 10, "uniform"),
                               generators=sample_generators(0, range(2)), **options)
    total, mean_abs = PINNED[key]
    assert out.sum().item() == pytest.approx(total, abs=1e-5)
    assert out.abs().mean().item() == pytest.approx(mean_abs, abs=1e-5)
