"""Forward process, posterior, formulations, respacing and loss, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusevae.config import DiffusionConfig
from diffusevae.core.diffusion import (FORMULATIONS, Schedule, extract, get_formulation,
                                       make_eps_fn, predict_eps, predict_y0, q_posterior, q_sample,
                                       respaced_timesteps, training_loss)
from diffusevae.names import FORMS, SPACINGS

T = 1000
SCHEDULE = Schedule.linear(T, 1e-4, 0.02)
# numpy float64, written from DDPM's definitions and nothing in the package
NP_BETAS = np.linspace(1e-4, 0.02, T)
NP_ABAR = np.cumprod(1.0 - NP_BETAS)




# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

def test_linear_schedule_matches_the_definition():
    assert SCHEDULE.T == len(SCHEDULE) == T
    for name in ("betas", "alphas", "alpha_bar"):
        assert getattr(SCHEDULE, name).dtype == torch.float64
    np.testing.assert_allclose(SCHEDULE.betas.numpy(), NP_BETAS, rtol=1e-12)
    np.testing.assert_allclose(SCHEDULE.alpha_bar.numpy(), NP_ABAR, rtol=1e-12)
    cfg_schedule = Schedule.from_config(DiffusionConfig(timesteps=50, beta_end=0.05))
    assert cfg_schedule.T == 50 and cfg_schedule.betas[-1].item() == pytest.approx(0.05)


def test_extract_casts_and_broadcasts():
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float16)
    out = extract(SCHEDULE.alpha_bar, torch.tensor([0, 10, 999]), like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float16
    assert out[1].item() == pytest.approx(NP_ABAR[10], rel=1e-3)
    assert extract(SCHEDULE.alpha_bar, 10, like) == pytest.approx(NP_ABAR[10], rel=1e-15)


def test_respaced_schedule_keeps_alpha_bar_and_implies_its_betas():
    taus = torch.tensor([0, 99, 499, 999])
    sub = SCHEDULE.respace(taus)
    np.testing.assert_allclose(sub.alpha_bar.numpy(), NP_ABAR[taus.numpy()], rtol=1e-14)
    prev = np.concatenate([[1.0], NP_ABAR[taus.numpy()][:-1]])
    np.testing.assert_allclose(sub.betas.numpy(), 1 - NP_ABAR[taus.numpy()] / prev, rtol=1e-12)
    np.testing.assert_allclose(torch.cumprod(sub.alphas, 0).numpy(), sub.alpha_bar.numpy(),
                               rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The forward process of each formulation
# --------------------------------------------------------------------------------------------

X0 = torch.tensor([0.5, -0.3, 0.8, -0.9], dtype=torch.float64).reshape(1, 1, 2, 2)
X_HAT = torch.tensor([0.2, 0.4, -0.6, 0.1], dtype=torch.float64).reshape(1, 1, 2, 2)


def closed_form_mean(name: str, abar: float) -> torch.Tensor:
    """E[x_t | x0, x_hat] of the state the network sees (docs/method.md#formulations)."""
    s = math.sqrt(abar)
    return {"uncond": s * X0, "form1": s * X0,
            "form2": s * X0 + (1 - s) * X_HAT, "form2-official": s * X0 + X_HAT}[name]


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_forward_marginal_of_each_formulation(name, t):
    n = 20_000
    form = get_formulation(name)
    x_hat = X_HAT.expand(n, 1, 2, 2) if form.conditioned else None
    eps = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    y0 = form.target(X0.expand(n, 1, 2, 2), x_hat)
    y_t = q_sample(SCHEDULE, y0, torch.full((n,), t), eps)
    x_t = form.net_input(y_t, x_hat)[:, :1]  # what the network sees
    abar = NP_ABAR[t]
    mean, var = closed_form_mean(name, abar), 1 - abar
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
    assert torch.all((x_t.mean(0, keepdim=True) - mean).abs() <= 5 * se_mean)
    assert torch.all((x_t.var(0) - var).abs() <= 5 * se_var)


def test_form2_follows_from_the_papers_one_step_kernel():
    """Composing q(x_t | x_{t-1}, x_hat) = N(sqrt(1-b) x_{t-1} + (1 - sqrt(1-b)) x_hat, b I) over
    steps 0..t gives form2's marginal, and not form2-official's."""
    n, checkpoints = 20_000, (10, 100, 500, 999)
    g = torch.Generator().manual_seed(0)
    x = X0.expand(n, 1, 2, 2).clone()
    x_hat = X_HAT.expand(n, 1, 2, 2)
    form2, official = get_formulation("form2"), get_formulation("form2-official")
    zero = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    for s in range(max(checkpoints) + 1):
        b = NP_BETAS[s]
        x = math.sqrt(1 - b) * x + (1 - math.sqrt(1 - b)) * x_hat + math.sqrt(b) * torch.randn(
            x.shape, generator=g, dtype=torch.float64)
        if s not in checkpoints:
            continue
        t = torch.tensor([s])
        var = 1 - NP_ABAR[s]
        means = {f.name: f.net_input(q_sample(SCHEDULE, f.target(X0, X_HAT), t, zero), X_HAT)[:, :1]
                 for f in (form2, official)}  # eps = 0 gives the marginal mean
        se = math.sqrt(var / n)
        emp = x.mean(0, keepdim=True)
        assert torch.all((emp - means["form2"]).abs() <= 5 * se), s
        assert abs(x.var(0).mean().item() - var) <= 5 * var * math.sqrt(2 / (4 * n)), s
        if s <= 500:  # there sqrt(abar_t) x_hat, the official marginal's excess, is visible
            assert torch.any((emp - means["form2-official"]).abs() > 20 * se), s


# --------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------

def bayes_posterior(abar: np.ndarray, i: int, y0: np.ndarray, y_t: np.ndarray):
    """q(y_{i-1} | y_i, y0) by Gaussian algebra: prior N(sqrt(abar_{i-1}) y0, 1 - abar_{i-1})
    times the likelihood N(y_i; sqrt(alpha_i) y_{i-1}, beta_i), alpha_i = abar_i / abar_{i-1}."""
    abar_prev = abar[i - 1]
    alpha = abar[i] / abar_prev
    beta = 1 - alpha
    precision = 1 / (1 - abar_prev) + alpha / beta
    var = 1 / precision
    mean = var * (math.sqrt(abar_prev) * y0 / (1 - abar_prev) + math.sqrt(alpha) * y_t / beta)
    return mean, var


def test_q_posterior_matches_bayes_on_full_and_respaced_chains():
    rng = np.random.default_rng(0)
    taus = respaced_timesteps(T, 10, "trailing")
    for schedule, abar, steps in ((SCHEDULE, NP_ABAR, [1, 2, 10, 500, 999]),
                                  (SCHEDULE.respace(taus), NP_ABAR[taus.numpy()], [1, 5, 9])):
        t = torch.tensor(steps)
        y0 = rng.standard_normal((len(steps), 1, 2, 2))
        y_t = rng.standard_normal((len(steps), 1, 2, 2))
        mean, var, log_var = q_posterior(schedule, torch.from_numpy(y0), torch.from_numpy(y_t), t)
        for b, i in enumerate(steps):
            m_ref, v_ref = bayes_posterior(abar, i, y0[b], y_t[b])
            np.testing.assert_allclose(mean[b].numpy(), m_ref, rtol=1e-9, atol=1e-12)
            assert var[b].item() == pytest.approx(v_ref, rel=1e-9)
            assert log_var[b].item() == pytest.approx(math.log(v_ref), rel=1e-9)


def test_q_posterior_at_the_first_step_is_y0():
    y0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y_t = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    mean, var, log_var = q_posterior(SCHEDULE, y0, y_t, torch.tensor([0, 0]))
    assert torch.allclose(mean, y0, atol=1e-12) and torch.all(var == 0)
    assert torch.all(log_var == SCHEDULE.posterior_variance[1].log())  # improved-diffusion's clip


def test_predict_y0_and_eps_invert_q_sample():
    y0 = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 999])
    y_t = q_sample(SCHEDULE, y0, t, eps)
    assert torch.allclose(predict_y0(SCHEDULE, y_t, t, eps), y0, atol=1e-9)
    assert torch.allclose(predict_eps(SCHEDULE, y_t, t, y0), eps, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The formulation interface
# --------------------------------------------------------------------------------------------

def test_formulation_registry_and_flags():
    assert tuple(FORMULATIONS) == FORMS
    assert [f.uses_vae for f in FORMULATIONS.values()] == [False, True, True, True]
    with pytest.raises(ValueError, match="unknown formulation"):
        get_formulation("form3")
    with pytest.raises(ValueError, match="pass x_hat"):
        get_formulation("form2").net_input(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("name", FORMS)
def test_target_readback_and_net_input(name):
    form = get_formulation(name)
    x0, x_hat, y_t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    xh = x_hat if form.conditioned else None
    assert torch.allclose(form.readback(form.target(x0, xh), xh), x0, atol=1e-6)
    expected_y0 = x0 - x_hat if name == "form2" else x0
    assert torch.allclose(form.target(x0, xh), expected_y0, atol=1e-6)
    net_in = form.net_input(y_t, xh)
    if not form.conditioned:
        assert torch.equal(net_in, y_t)
        return
    assert net_in.shape == (3, 4, 4, 4)
    shift = x_hat if name in ("form2", "form2-official") else 0
    assert torch.allclose(net_in[:, :2], y_t + shift, atol=1e-6)
    assert torch.equal(net_in[:, 2:], x_hat)
    # the mask drops only the conditioning channels, never the shift
    masked = form.net_input(y_t, x_hat, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(masked[:, :2], net_in[:, :2])
    assert torch.equal(masked[1, 2:], torch.zeros(2, 4, 4))
    assert torch.equal(masked[0, 2:], x_hat[0]) and torch.equal(masked[2, 2:], x_hat[2])
    bool_mask = form.net_input(y_t, x_hat, torch.tensor([True, False, True]))
    assert torch.equal(bool_mask, masked)


def test_clip_fn_clips_the_image_in_data_space():
    x_hat = torch.full((1, 1, 2, 2), 0.5)
    y0_pred = torch.tensor([-3.0, -1.2, 0.2, 3.0]).reshape(1, 1, 2, 2)
    form2 = get_formulation("form2").clip_fn(x_hat)(y0_pred)
    assert torch.allclose(form2 + x_hat, torch.tensor([-1.0, -0.7, 0.7, 1.0]).reshape(1, 1, 2, 2))
    form1 = get_formulation("form1").clip_fn(x_hat)(y0_pred)
    assert torch.allclose(form1, torch.tensor([-1.0, -1.0, 0.2, 1.0]).reshape(1, 1, 2, 2))


# --------------------------------------------------------------------------------------------
# Respacing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("S", [1, 5, 10, 50, 100, 1000])
def test_respaced_timesteps_are_distinct_ascending_and_in_range(spacing, S):
    taus = respaced_timesteps(T, S, spacing)
    assert taus.dtype == torch.long and taus.shape == (S,)
    assert taus.min() >= 0 and taus.max() <= T - 1
    assert torch.all(taus[1:] > taus[:-1])
    if spacing == "uniform":
        assert taus[0] == 0
    if spacing == "trailing":
        assert taus[-1] == T - 1


def test_respaced_timesteps_values():
    assert respaced_timesteps(T, 10, "uniform").tolist() == list(range(0, 1000, 100))
    assert respaced_timesteps(T, 10, "trailing").tolist() == list(range(99, 1000, 100))
    assert respaced_timesteps(T, 1000, "trailing").tolist() == list(range(1000))
    quad = respaced_timesteps(T, 50, "quad")
    assert len(set(quad.tolist())) == 50  # the official code had 49 distinct of 50
    assert quad[-1] == 800 and quad[:4].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("small_T", [1, 2, 3, 7, 10])
def test_respacing_small_chains(small_T):
    for spacing in SPACINGS:
        for S in range(1, small_T + 1):
            taus = respaced_timesteps(small_T, S, spacing)
            assert len(set(taus.tolist())) == S and 0 <= taus.min() and taus.max() < small_T


def test_respacing_errors():
    for S in (0, -1, T + 1):
        with pytest.raises(ValueError, match="1..1000"):
            respaced_timesteps(T, S, "uniform")
    with pytest.raises(ValueError, match="unknown spacing"):
        respaced_timesteps(T, 10, "cosine")
    with pytest.raises(ValueError, match="ascending"):
        SCHEDULE.respace([5, 5, 6])
    with pytest.raises(ValueError, match="ascending"):
        SCHEDULE.respace([0, 1000])


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

C = 2


class TinyNet(nn.Module):
    """A tiny stand-in for the UNet: model(x_in, t, z=None) -> eps."""

    def __init__(self, in_ch: int, z_dim: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, C, 3, padding=1)
        self.z = nn.Linear(z_dim, C) if z_dim else None

    def forward(self, x_in, t, z=None):
        out = self.conv(x_in) * (1 + t.float() / 1000).reshape(-1, 1, 1, 1)
        if z is not None:
            out = out + self.z(z)[:, :, None, None]
        return out


class Spy:
    """Records what the network sees; predicts eps = 0."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, t, z=None):
        self.calls.append((x_in.clone(), t.clone(), None if z is None else z.clone()))
        return torch.zeros(x_in.shape[0], C, *x_in.shape[2:], dtype=x_in.dtype)


def _batch(B=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, C, 8, 8, generator=g, dtype=dtype) * 2 - 1
    x_hat = (x0 + 0.3 * torch.randn(B, C, 8, 8, generator=g, dtype=dtype)).clamp(-1, 1)
    z = torch.randn(B, 5, generator=g, dtype=dtype)
    return x0, x_hat, z


def test_training_loss_finite_seeded_and_differentiable():
    x0, x_hat, z = _batch()
    model = TinyNet(2 * C, z_dim=5)
    form = get_formulation("form2")
    loss = lambda seed: training_loss(  # noqa: E731
        model, SCHEDULE, form, x0, x_hat, z, p_uncond=0.2,
        generator=torch.Generator().manual_seed(seed))
    a, b, c = loss(0), loss(0), loss(1)
    assert torch.isfinite(a) and a.ndim == 0
    assert a.item() == b.item() and a.item() != c.item()
    a.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", FORMS)
def test_training_loss_is_the_eps_mse_of_what_the_network_sees(name):
    """With a network predicting 0, the loss is mean(eps^2), eps recovered from the net input."""
    form = get_formulation(name)
    x0, x_hat, z = _batch(dtype=torch.float64)
    xh, zz = (x_hat, z) if form.conditioned else (None, None)
    spy = Spy()
    loss = training_loss(spy, SCHEDULE, form, x0, xh, zz,
                         generator=torch.Generator().manual_seed(3))
    (x_in, t, z_seen), = spy.calls
    assert x_in.shape[1] == (2 * C if form.conditioned else C)
    assert (z_seen is None) == (not form.conditioned)
    if form.conditioned:
        assert torch.equal(x_in[:, C:], x_hat) and torch.equal(z_seen, z)
    x_t = x_in[:, :C]
    y_t = x_t - x_hat if name in ("form2", "form2-official") else x_t
    y0 = x0 - x_hat if name == "form2" else x0
    abar = torch.from_numpy(NP_ABAR)[t].reshape(-1, 1, 1, 1)
    eps = (y_t - abar.sqrt() * y0) / (1 - abar).sqrt()
    assert loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)
    assert 0.5 < loss.item() < 1.5  # a standard normal's second moment


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_loss_weights_each_samples_eps_error_by_min_snr_gamma_over_snr(gamma):
    """Hang et al. 2023 for eps-prediction: w_t = min(SNR_t, gamma) / SNR_t, SNR = abar/(1-abar),
    each sample's mean squared eps error weighted by its own t's w."""
    form = get_formulation("form2")
    x0, x_hat, z = _batch(dtype=torch.float64)
    spy = Spy()
    loss = training_loss(spy, SCHEDULE, form, x0, x_hat, None, min_snr_gamma=gamma,
                         generator=torch.Generator().manual_seed(3))
    (x_in, t, _), = spy.calls
    abar = torch.from_numpy(NP_ABAR)[t]
    snr = abar / (1 - abar)
    w = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    y_t, y0 = x_in[:, :C] - x_hat, x0 - x_hat
    a = abar.reshape(-1, 1, 1, 1)
    eps = (y_t - a.sqrt() * y0) / (1 - a).sqrt()
    expected = (w * eps.pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = training_loss(Spy(), SCHEDULE, form, x0, x_hat, None,
                               generator=torch.Generator().manual_seed(3))
    assert loss.item() < unweighted.item()  # every weight <= 1, some < 1 at these t


def test_min_snr_weights_keep_the_noisy_steps_and_lower_the_clean_ones():
    from diffusevae.core.diffusion import min_snr_weights
    t = torch.tensor([0, 10, 100, 500, 999])
    w = min_snr_weights(SCHEDULE, t, 5.0)
    snr = NP_ABAR[t.numpy()] / (1 - NP_ABAR[t.numpy()])
    assert w.numpy() == pytest.approx(np.minimum(snr, 5.0) / snr, rel=1e-6)
    assert w[-1] == 1.0 and w[0] < 1e-3  # SNR(999) << 5; SNR(0) ~ 1e4


def test_p_uncond_one_drops_all_conditioning_but_not_the_shift():
    x0, x_hat, z = _batch(dtype=torch.float64)
    spy = Spy()
    loss = training_loss(spy, SCHEDULE, get_formulation("form2"), x0, x_hat, z, p_uncond=1.0,
                         generator=torch.Generator().manual_seed(0))
    (x_in, t, z_seen), = spy.calls
    assert torch.all(x_in[:, C:] == 0) and torch.all(z_seen == 0)
    # the state still carries its shift: x_t = y_t + x_hat, so eps recovered that way is the
    # very eps of the loss
    abar = torch.from_numpy(NP_ABAR)[t].reshape(-1, 1, 1, 1)
    eps = (x_in[:, :C] - x_hat - abar.sqrt() * (x0 - x_hat)) / (1 - abar).sqrt()
    assert loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)


def test_p_uncond_drops_per_sample_consistently():
    x0, x_hat, z = _batch(B=400)
    x_hat = x_hat + 2.0  # no zeros by chance
    spy = Spy()
    training_loss(spy, SCHEDULE, get_formulation("form1"), x0, x_hat, z, p_uncond=0.5,
                  generator=torch.Generator().manual_seed(0))
    (x_in, _, z_seen), = spy.calls
    dropped_x = (x_in[:, C:] == 0).flatten(1).all(1)
    kept_x = torch.isclose(x_in[:, C:], x_hat).flatten(1).all(1)
    dropped_z = (z_seen == 0).all(1)
    assert torch.all(dropped_x ^ kept_x) and torch.equal(dropped_x, dropped_z)
    assert 120 < int(dropped_x.sum()) < 280  # per sample, about half


def test_uncond_loss_without_vae():
    x0, _, _ = _batch()
    model = TinyNet(C)
    loss = training_loss(model, SCHEDULE, get_formulation("uncond"), x0,
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="pass x_hat"):
        training_loss(TinyNet(2 * C), SCHEDULE, get_formulation("form2"), x0)
    with pytest.raises(ValueError, match="p_uncond"):
        training_loss(model, SCHEDULE, get_formulation("uncond"), x0, p_uncond=1.5)


# --------------------------------------------------------------------------------------------
# The network as a noise predictor, with guidance
# --------------------------------------------------------------------------------------------

def test_make_eps_fn_guidance():
    form = get_formulation("form2")
    x_hat, z = torch.full((3, C, 4, 4), 0.25), torch.ones(3, 5)

    def model(x_in, t, z=None):  # eps = 2 * cond + mean(z) + shifted state
        return 2 * x_in[:, C:] + z.mean(1).reshape(-1, 1, 1, 1) + x_in[:, :C]

    y_t = torch.randn(3, C, 4, 4)
    t = torch.full((3,), 10)
    plain = make_eps_fn(model, form, x_hat, z)(y_t, t)
    assert torch.allclose(plain, 2 * x_hat + 1 + y_t + x_hat, atol=1e-5)
    w = 2.0
    guided = make_eps_fn(model, form, x_hat, z, guidance=w)(y_t, t)
    uncond = y_t + x_hat  # conditioning and z dropped, the shift kept
    assert torch.allclose(guided, (1 + w) * plain - w * uncond, atol=1e-5)
    with pytest.raises(ValueError, match="conditioned"):
        make_eps_fn(model, get_formulation("uncond"), guidance=1.0)
