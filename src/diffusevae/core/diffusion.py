"""Forward process, posterior, the four formulations and the refiner's loss (docs/method.md).

Everything here is one standard DDPM (Ho et al. 2020) run in a coordinate ``y``:

    y_t = sqrt(alpha_bar_t) y0 + sqrt(1 - alpha_bar_t) eps,        eps ~ N(0, I)       (DDPM eq. 4)

A *formulation* only says what ``y0`` is, what the network sees and how the image is read back
(`Formulation`). Samplers (core/samplers.py) run on ``y`` and never see a formulation.

Schedules are stored in float64 and cast at use (`extract`). Timesteps are 0-indexed, 0..T-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import names
from ..config import DiffusionConfig
from ..rng import BatchShard

EpsFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Schedule (docs/method.md#notation)
# --------------------------------------------------------------------------------------------

class Schedule:
    """A variance schedule beta_t, t = 0..T-1, and every coefficient derived from it (float64).

    Built from ``betas`` (the linear schedule) or from ``alpha_bar`` (a respaced chain, whose
    betas are beta'_i = 1 - alpha_bar'_i / alpha_bar'_{i-1}, docs/method.md#respacing). The
    step before the first has alpha_bar = 1, so the posterior at index 0 is a point mass at y0.
    """

    def __init__(self, betas: Tensor, alpha_bar: Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(
                f"betas must be a non-empty 1-D tensor; got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]; are the timesteps distinct?")
        self.betas = betas
        self.alphas = 1.0 - betas
        if alpha_bar is None:
            alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).detach().cpu()
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

        # q_sample and the eps <-> y0 conversions (DDPM eq. 4 solved for y0 or eps)
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar = (1.0 / self.alpha_bar).sqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / self.alpha_bar - 1.0).sqrt()

        # q(y_{t-1} | y_t, y0) = N(coef1 y0 + coef2 y_t, beta_tilde_t)     (DDPM eq. 6-7)
        one_minus = 1.0 - self.alpha_bar
        self.posterior_variance = self.betas * (1.0 - self.alpha_bar_prev) / one_minus
        self.posterior_mean_coef1 = self.betas * self.alpha_bar_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / one_minus
        # beta_tilde_0 = 0; as in improved-diffusion, the log is "clipped" by repeating
        # beta_tilde_1 at index 0 (only a likelihood term ever reads it; sampling adds no noise
        # at the last step). A one-step chain has no beta_tilde_1: a tiny floor stands in.
        if len(betas) > 1:
            head = self.posterior_variance[1:2]
        else:
            head = torch.full((1,), 1e-20, dtype=torch.float64)
        self.posterior_log_variance_clipped = torch.cat([head, self.posterior_variance[1:]]).log()

    @property
    def T(self) -> int:
        """Number of steps in this chain."""
        return len(self.betas)

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        return (f"Schedule(T={self.T}, beta[0]={self.betas[0].item():.3g}, "
                f"beta[-1]={self.betas[-1].item():.3g})")

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """Ho et al.'s linear schedule: beta_t evenly spaced from beta_start to beta_end."""
        if T < 1:
            raise ValueError(f"a schedule needs T >= 1 steps; got {T}")
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        return cls.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end)

    @classmethod
    def from_alpha_bar(cls, alpha_bar: Tensor) -> "Schedule":
        """The chain whose cumulative products are exactly ``alpha_bar`` (strictly decreasing)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return cls(1.0 - alpha_bar / prev, alpha_bar=alpha_bar)

    def respace(self, timesteps: Tensor | Sequence[int]) -> "Schedule":
        """The chain respaced to ``timesteps``, ascending original steps (docs/method.md#respacing).

        alpha_bar'_i = alpha_bar[tau_i] and beta'_i = 1 - alpha_bar'_i / alpha_bar'_{i-1}.
        """
        taus = check_timesteps(timesteps, self.T)
        return Schedule.from_alpha_bar(self.alpha_bar[taus])

    def floats(self) -> "ScheduleFloats":
        """The coefficients as tuples of Python floats, for loops that read one step at a time."""
        return ScheduleFloats(**{f.name: tuple(getattr(self, f.name).tolist())
                                 for f in fields(ScheduleFloats)})


@dataclass(frozen=True)
class ScheduleFloats:
    """What `q_sample`, `q_posterior`, `predict_y0` and `predict_eps` read, as Python floats.

    Those functions take it in place of a `Schedule` for an int step: a sampler converts its
    respaced chain once per call (`Schedule.floats`), and a step is then tensor-by-scalar
    arithmetic with the very float64 values `extract` would take from the tensors, without
    indexing a tensor and calling ``.item()`` at every step.
    """

    sqrt_alpha_bar: tuple[float, ...]
    sqrt_one_minus_alpha_bar: tuple[float, ...]
    sqrt_recip_alpha_bar: tuple[float, ...]
    sqrt_recipm1_alpha_bar: tuple[float, ...]
    posterior_variance: tuple[float, ...]
    posterior_mean_coef1: tuple[float, ...]
    posterior_mean_coef2: tuple[float, ...]
    posterior_log_variance_clipped: tuple[float, ...]


def extract(a: Tensor | Sequence[float], t: Tensor | int, like: Tensor) -> Tensor | float:
    """``a[t]`` cast to ``like``'s dtype and device, shaped (B, 1, 1, 1) to broadcast over it.

    With an int ``t`` (one step for the whole batch, as samplers use it) it is a Python float,
    which broadcasts and casts by itself; ``a`` may then also be a sequence of floats (a
    coefficient of `ScheduleFloats`).
    """
    if isinstance(t, int):
        return float(a[t])
    out = a[t.detach().to(device=a.device, dtype=torch.long)]
    return out.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: Schedule | ScheduleFloats, y0: Tensor, t: Tensor | int,
             eps: Tensor) -> Tensor:
    """y_t = sqrt(alpha_bar_t) y0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4)."""
    return (extract(schedule.sqrt_alpha_bar, t, y0) * y0
            + extract(schedule.sqrt_one_minus_alpha_bar, t, y0) * eps)


def q_posterior(schedule: Schedule | ScheduleFloats, y0: Tensor, y_t: Tensor, t: Tensor | int
                ) -> tuple[Tensor, Tensor | float, Tensor | float]:
    """Mean, variance and clipped log-variance of q(y_{t-1} | y_t, y0) (DDPM eq. 6-7).

    ``t`` indexes ``schedule``: for a respaced chain pass the respaced index i, not tau_i.
    """
    mean = (extract(schedule.posterior_mean_coef1, t, y_t) * y0
            + extract(schedule.posterior_mean_coef2, t, y_t) * y_t)
    return (mean, extract(schedule.posterior_variance, t, y_t),
            extract(schedule.posterior_log_variance_clipped, t, y_t))


def predict_y0(schedule: Schedule | ScheduleFloats, y_t: Tensor, t: Tensor | int,
               eps: Tensor) -> Tensor:
    """y0 from y_t and a noise prediction: eq. 4 solved for y0."""
    return (extract(schedule.sqrt_recip_alpha_bar, t, y_t) * y_t
            - extract(schedule.sqrt_recipm1_alpha_bar, t, y_t) * eps)


def predict_eps(schedule: Schedule | ScheduleFloats, y_t: Tensor, t: Tensor | int,
                y0: Tensor) -> Tensor:
    """eps from y_t and a prediction of y0: eq. 4 solved for eps (used after clipping y0)."""
    return ((extract(schedule.sqrt_recip_alpha_bar, t, y_t) * y_t - y0)
            / extract(schedule.sqrt_recipm1_alpha_bar, t, y_t))


# --------------------------------------------------------------------------------------------
# Formulations (docs/method.md#formulations)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Formulation:
    """One row of docs/method.md#formulations: the same DDPM in the coordinate y, three switches.

    ============== =========== ========= ========= ============================================
    name           conditioned shifted   residual  meaning
    ============== =========== ========= ========= ============================================
    uncond         no          no        no        plain DDPM on x0, no VAE (the baseline)
    form1          yes         no        no        y0 = x0, net sees [y_t, x_hat]
    form2          yes         yes       yes       y0 = x0 - x_hat, net sees [y_t + x_hat, x_hat]
    form2-official yes         yes       no        y0 = x0, net sees [y_t + x_hat, x_hat]
    ============== =========== ========= ========= ============================================

    The sampler always starts from y_T ~ N(0, I), for every formulation. For the shifted
    forms this *is* x_T ~ N(x_hat, I) of the paper, since x_T = y_T + x_hat.

    Why ``form2`` is the default (docs/method.md#form2-derivation): it is what the paper's step
    q(x_t | x_{t-1}, x_hat) = N(sqrt(1-beta_t) x_{t-1} + (1 - sqrt(1-beta_t)) x_hat, beta_t I)
    implies. Composing that step gives the marginal
    N(sqrt(alpha_bar_t) x0 + (1 - sqrt(alpha_bar_t)) x_hat, (1 - alpha_bar_t) I), i.e. a DDPM on
    y0 = x0 - x_hat seen at x_t = y_t + x_hat: the chain starts at x0 and ends near N(x_hat, I).
    ``form2-official`` reproduces the official code, which uses the marginal
    N(sqrt(alpha_bar_t) x0 + x_hat, (1 - alpha_bar_t) I) instead: it does not follow from that step
    (at t = 0 the network sees x0 + x_hat, not x0) and the image is y0 itself. Keep it only to
    reproduce results of the official checkpoints (docs/method.md#form2-official).
    """

    name: str
    conditioned: bool  # the network also sees x_hat (2C channels) and may see z
    shifted: bool  # the network sees x_t = y_t + x_hat instead of y_t
    residual: bool  # the diffused target is y0 = x0 - x_hat, read back as y0 + x_hat

    @property
    def uses_vae(self) -> bool:
        """Whether training and sampling need the stage-1 VAE (x_hat, z)."""
        return self.conditioned

    def _need_x_hat(self, x_hat: Tensor | None) -> None:
        if self.conditioned and x_hat is None:
            raise ValueError(f"formulation {self.name!r} is conditioned on x_hat; pass x_hat")

    def target(self, x0: Tensor, x_hat: Tensor | None = None) -> Tensor:
        """y0, the clean state the DDPM diffuses."""
        self._need_x_hat(x_hat)
        return x0 - x_hat if self.residual else x0

    def readback(self, y0: Tensor, x_hat: Tensor | None = None) -> Tensor:
        """The image from a clean state y0 (the inverse of `target`)."""
        self._need_x_hat(x_hat)
        return y0 + x_hat if self.residual else y0

    def shift(self, x_hat: Tensor | None) -> Tensor | float:
        """a(x_hat): the network sees x_t = y_t + a(x_hat)."""
        self._need_x_hat(x_hat)
        return x_hat if self.shifted else 0.0

    def net_input(self, y_t: Tensor, x_hat: Tensor | None = None,
                  cond_mask: Tensor | None = None) -> Tensor:
        """What the network sees: y_t (C channels) or [y_t + a(x_hat), x_hat * mask] (2C).

        ``cond_mask`` (B,), 1 = keep, 0 = drop: it zeroes only the concatenated conditioning
        channels (classifier-free guidance), never the shift, which is part of the state.
        """
        if not self.conditioned:
            return y_t
        x_t = y_t + self.shift(x_hat)
        cond = x_hat
        if cond_mask is not None:
            cond = x_hat * cond_mask.to(x_hat.dtype).reshape(-1, *([1] * (x_hat.ndim - 1)))
        return torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # (B, 2C, H, W)

    def clip_fn(self, x_hat: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """A y0-prediction clipper that clips the *image* to [-1, 1] (docs/method.md#clipping)."""
        self._need_x_hat(x_hat)

        def clip(y0_pred: Tensor) -> Tensor:
            return self.target(self.readback(y0_pred, x_hat).clamp(-1.0, 1.0), x_hat)

        return clip


FORMULATIONS: dict[str, Formulation] = {
    "uncond": Formulation("uncond", conditioned=False, shifted=False, residual=False),
    "form1": Formulation("form1", conditioned=True, shifted=False, residual=False),
    "form2": Formulation("form2", conditioned=True, shifted=True, residual=True),
    "form2-official": Formulation("form2-official", conditioned=True, shifted=True,
                                  residual=False),
}
names.check_registry("diffusion.FORMULATIONS", FORMULATIONS, names.FORMS)


def get_formulation(name: str) -> Formulation:
    """The formulation called ``name`` (one of FORMULATIONS)."""
    if name not in FORMULATIONS:
        raise ValueError(f"unknown formulation {name!r}; choose one of {', '.join(FORMULATIONS)}")
    return FORMULATIONS[name]


# --------------------------------------------------------------------------------------------
# The network as a noise predictor, and the training loss
# --------------------------------------------------------------------------------------------

def _call(model: Callable, x_in: Tensor, t: Tensor, z: Tensor | None) -> Tensor:
    return model(x_in, t) if z is None else model(x_in, t, z)


def make_eps_fn(model: Callable, form: Formulation, x_hat: Tensor | None = None,
                z: Tensor | None = None, guidance: float = 0.0) -> EpsFn:
    """Wrap ``model(x_in, t, z=None) -> eps`` into the samplers' ``eps_fn(y_t, t)``.

    With ``guidance`` w > 0: eps = (1 + w) eps(x_hat, z) - w eps(none) (classifier-free guidance),
    both halves in one forward pass of a doubled batch; "none" zeroes the x_hat channels and z,
    exactly as `training_loss` drops them.
    """
    form._need_x_hat(x_hat)
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0; got {guidance}")
    if guidance > 0 and not form.conditioned:
        raise ValueError(f"guidance needs a conditioned formulation; {form.name!r} is not")

    def eps_fn(y_t: Tensor, t: Tensor) -> Tensor:
        if guidance == 0:
            return _call(model, form.net_input(y_t, x_hat), t, z)
        B = y_t.shape[0]
        mask = torch.cat([torch.ones(B, device=y_t.device), torch.zeros(B, device=y_t.device)])
        x_in = form.net_input(torch.cat([y_t, y_t]), torch.cat([x_hat, x_hat]), mask)
        zz = None if z is None else torch.cat([z, torch.zeros_like(z)])
        eps_c, eps_u = _call(model, x_in, torch.cat([t, t]), zz).chunk(2)
        return (1.0 + guidance) * eps_c - guidance * eps_u

    return eps_fn


def min_snr_weights(schedule: Schedule, t: Tensor, gamma: float) -> Tensor:
    """min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t): Min-SNR-gamma
    weighting of the eps loss (Hang et al. 2023, eq. 9 for eps-prediction). Steps with
    SNR <= gamma (the noisy ones) keep weight 1; the nearly clean ones, whose eps is hard to
    see and easy to overfit, weigh less."""
    ab = schedule.alpha_bar[t.cpu()]
    snr = ab / (1.0 - ab)
    return (snr.clamp(max=gamma) / snr).float().to(t.device)


def training_loss(model: Callable, schedule: Schedule, form: Formulation, x0: Tensor,
                  x_hat: Tensor | None = None, z: Tensor | None = None, p_uncond: float = 0.0,
                  generator: torch.Generator | BatchShard | None = None,
                  min_snr_gamma: float = 0.0) -> Tensor:
    """The simple loss ||eps - eps_theta(net_input(y_t), t, z)||^2, averaged (DDPM eq. 14).

    t ~ U{0..T-1} and eps ~ N(0, I) per sample; with ``p_uncond`` > 0 each sample's
    conditioning (the x_hat channels and z, not the shift) is dropped to zeros with that
    probability, for classifier-free guidance (per sample, not per batch as the official code).
    With ``min_snr_gamma`` > 0 each sample's squared error is weighted by `min_snr_weights`.
    Random draws come from ``generator`` on its own device, then move to x0's device; a
    `BatchShard` draws them for its rows of a batch split across processes.
    """
    form._need_x_hat(x_hat)
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1]; got {p_uncond}")
    B, device = x0.shape[0], x0.device
    draws = BatchShard.of(generator, B, device)
    t = draws.randint(schedule.T, (B,)).to(device)
    eps = draws.randn(x0.shape, dtype=x0.dtype).to(device)
    mask = None
    if form.conditioned and p_uncond > 0:
        keep = draws.rand((B,)) >= p_uncond
        mask = keep.to(device=device, dtype=x0.dtype)
        if z is not None:
            z = z * mask.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    if not form.conditioned:
        z = None

    y0 = form.target(x0, x_hat)
    y_t = q_sample(schedule, y0, t, eps)
    eps_pred = _call(model, form.net_input(y_t, x_hat, mask), t, z)
    dtype = torch.promote_types(eps_pred.dtype, torch.float32)  # never average in half precision
    if min_snr_gamma <= 0:
        return F.mse_loss(eps_pred.to(dtype), eps.to(dtype))
    per_sample = (eps_pred.to(dtype) - eps.to(dtype)).square().flatten(1).mean(1)  # (B,)
    return (min_snr_weights(schedule, t, min_snr_gamma).to(dtype) * per_sample).mean()


# --------------------------------------------------------------------------------------------
# Respacing (docs/method.md#respacing)
# --------------------------------------------------------------------------------------------

def respaced_timesteps(T: int, S: int, spacing: str = "uniform") -> Tensor:
    """S distinct ascending original timesteps tau_1 < ... < tau_S in 0..T-1.

    ``uniform``: floor(i T / S), starting at 0 (DDIM and the official code);
    ``trailing``: round(T - i T / S) - 1, ending at T-1;
    ``quad``: DDIM's floor(linspace(0, sqrt(0.8 T), S)^2), with collisions bumped upward so
    that S steps are S distinct steps (the official code silently ran 49 steps for 50).
    """
    if spacing not in names.SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of "
                         f"{', '.join(names.SPACINGS)}")
    if not 1 <= S <= T:
        raise ValueError(f"the number of sampling steps must be in 1..{T} (T); got {S}")
    if spacing == "uniform":
        taus = [i * T // S for i in range(S)]
    elif spacing == "trailing":
        taus = sorted(round(T - i * T / S) - 1 for i in range(S))
    else:
        top = math.sqrt(0.8 * T)
        taus = [int((top * i / (S - 1)) ** 2) if S > 1 else 0 for i in range(S)]
        for i in range(1, S):  # bump collisions up; stays <= max(S - 1, 0.8 T) <= T - 1
            taus[i] = max(taus[i], taus[i - 1] + 1)
    return check_timesteps(torch.tensor(taus, dtype=torch.long), T)


def check_timesteps(timesteps: Tensor | Sequence[int], T: int) -> Tensor:
    """``timesteps`` as a LongTensor, or a ValueError unless strictly ascending in 0..T-1."""
    taus = torch.as_tensor(timesteps, dtype=torch.long).detach().cpu()
    if taus.ndim != 1 or taus.numel() == 0:
        raise ValueError(
            f"timesteps must be a non-empty 1-D sequence; got shape {tuple(taus.shape)}")
    if int(taus[0]) < 0 or int(taus[-1]) > T - 1 or bool((taus[1:] <= taus[:-1]).any()):
        raise ValueError(f"timesteps must be strictly ascending within 0..{T - 1}; got "
                         f"{taus.tolist() if taus.numel() <= 20 else 'a sequence that is not'}")
    return taus
