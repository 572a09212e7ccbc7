"""What several test files share: Gaussian data with its exact noise predictor (the oracle of
the samplers, inversion and the likelihood tests), and a tiny untrained DiffuseVAE.

Importable as `oracles` from any test folder (pytest puts tests/ on the path with conftest.py).
"""

from __future__ import annotations

import torch

from diffusevae.config import DiffusionConfig, UNetConfig, VAEConfig
from diffusevae.core.diffusion import Schedule
from diffusevae.core.unet import UNet
from diffusevae.core.vae import VAE
from diffusevae.model.pipeline import DiffuseVAE

SCHEDULE = Schedule.linear(1000, 1e-4, 0.02)


# --------------------------------------------------------------------------------------------
# The oracle: for Gaussian data the exact noise predictor is known in closed form.
# --------------------------------------------------------------------------------------------
# x0 ~ N(MU, SIGMA) in d = 4 dimensions, seen as a (1, 2, 2) image; X_HAT is a fixed coarse image.
MU = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
_A = torch.tensor([[0.4, 0.1, 0.0, 0.2], [0.0, 0.3, 0.2, -0.1],
                   [0.1, -0.2, 0.35, 0.0], [0.2, 0.0, -0.1, 0.3]], dtype=torch.float64)
SIGMA = _A @ _A.T + 0.02 * torch.eye(4, dtype=torch.float64)  # eigenvalues 0.03 .. 0.34
X_HAT = torch.tensor([0.4, -0.3, 0.2, 0.6], dtype=torch.float64)
N = 4000


def network_marginal_mean(form_name: str, abar: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """E[x_t | x_hat] of the state the network sees, from the table of docs/method.md#formulations
    (not from the code)."""
    mean = abar.sqrt() * MU
    if form_name == "form2":
        mean = mean + (1 - abar.sqrt()) * x_hat
    elif form_name == "form2-official":
        mean = mean + x_hat
    return mean


def oracle_model(form_name: str, conditioned: bool):
    """The exact eps predictor E[eps | x_t, x_hat] as a network: model(x_in, t) -> eps.

    y0 ~ N(m, S)  =>  y_t ~ N(sqrt(abar) m, abar S + (1 - abar) I) and
    E[eps | y_t] = sqrt(1 - abar) (abar S + (1 - abar) I)^{-1} (y_t - sqrt(abar) m);
    here in the network's coordinates x_t (the covariance is the same, only the mean moves).
    """

    def model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_in.shape[0]
        assert bool((t == t[0]).all())
        abar = SCHEDULE.alpha_bar[int(t[0])]
        x_t = x_in[:, :1].reshape(B, 4)
        x_hat = x_in[:, 1:].reshape(B, 4) if conditioned else None
        cov = abar * SIGMA + (1 - abar) * torch.eye(4, dtype=torch.float64)
        resid = x_t - network_marginal_mean(form_name, abar, x_hat)
        eps = (1 - abar).sqrt() * torch.linalg.solve(cov, resid.T).T
        return eps.reshape(B, 1, 2, 2)

    return model


# --------------------------------------------------------------------------------------------
# A tiny untrained DiffuseVAE
# --------------------------------------------------------------------------------------------

def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Untrained but non-trivial weights (the UNet's zero-initialised layers would give eps=0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def tiny_pipeline(form: str = "form2", p_uncond: float = 0.0, z_dim: int = 0,
                  timesteps: int = 1000) -> DiffuseVAE:
    torch.manual_seed(0)
    vae = randomised(VAE(VAEConfig()), 1)
    unet = UNet(UNetConfig(base_channels=16, cond=form != "uncond", z_dim=z_dim))
    return DiffuseVAE(vae, randomised(unet, 2), DiffusionConfig(timesteps=timesteps, form=form,
                                                              p_uncond=p_uncond))
