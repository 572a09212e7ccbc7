"""Latent priors p(z): the standard normal, and Ex-PDE, a Gaussian mixture fitted to encodings.

A VAE's aggregate posterior q(z) = E_x q(z|x) rarely fills N(0, I): z drawn from the standard
normal can land in "holes" the decoder never saw, and give poor x_hat. Ex-PDE (DiffuseVAE §4.3,
after Ghosh et al. 2020) fits a full-covariance Gaussian mixture to the encoded training set and
samples z from it instead.

Decisions a caller should know:
- This module is the mathematics alone. A run keeps its mixture in ``RUN/prior``
  (`diffusevae.model.prior_files`); `diffusevae.tasks.prior_fitting` fits it to a run.
- Sampling is per sample: sample i draws its component (one uniform) and then its Gaussian
  (z_dim normals) from its own generator, so z depends only on (seed, i). Samples are therefore
  not grouped by component, unlike the official code, which drew each component's samples in a
  block.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from .. import rng
from ..errors import ConfigError
from ..rng import randn_like_per_sample

PRIORS = ("normal", "gmm")
_SKLEARN = 0  # rng.LIBRARY's index for scikit-learn's random_state (32 bits: derived, not cut)


class GaussianMixture:
    """A mixture sum_k w_k N(mu_k, Sigma_k) over R^d, full covariances, float64 on the CPU."""

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor):
        w = torch.as_tensor(weights, dtype=torch.float64).cpu()
        m = torch.as_tensor(means, dtype=torch.float64).cpu()
        c = torch.as_tensor(covariances, dtype=torch.float64).cpu()
        K = w.shape[0] if w.ndim == 1 else -1
        if K < 1 or m.ndim != 2 or m.shape[0] != K or c.shape != (K, m.shape[1], m.shape[1]):
            raise ValueError(f"a mixture needs weights (K,), means (K, d), covariances (K, d, d); "
                             f"got {tuple(w.shape)}, {tuple(m.shape)}, {tuple(c.shape)}")
        for name, t in (("weights", w), ("means", m), ("covariances", c)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the mixture {name} hold non-finite values (nan or inf)")
        if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1; they sum to "
                             f"{float(w.sum()):.6g}")
        if not torch.allclose(c, c.transpose(1, 2), rtol=1e-6, atol=1e-9):
            raise ValueError("every mixture covariance must be symmetric")
        L, info = torch.linalg.cholesky_ex(c)
        if bool(info.any()) or not bool(torch.isfinite(L).all()):
            raise ValueError("every mixture covariance must be positive definite (positive "
                             "variances)")
        self.weights, self.means, self.covariances, self.scale_tril = w / w.sum(), m, c, L
        self.cum_weights = torch.cumsum(self.weights, 0)

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    @property
    def z_dim(self) -> int:
        return self.means.shape[1]

    def sample(self, generators: Sequence[torch.Generator], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, d) draws, row b from ``generators[b]``: a component k ~ w, then mu_k + L_k eps."""
        rows = []
        for g in generators:
            u = torch.rand((), generator=g, device=g.device, dtype=torch.float64).cpu()
            k = min(int(torch.searchsorted(self.cum_weights, u, right=True)),
                    self.n_components - 1)  # guards u at the float edge of the last weight
            eps = torch.randn(self.z_dim, generator=g, device=g.device, dtype=torch.float32)
            rows.append(self.means[k] + self.scale_tril[k] @ eps.cpu().double())
        out = torch.stack(rows) if rows else self.means.new_zeros(0, self.z_dim)
        return out.to(device=device, dtype=dtype)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) per row of z (B, d), in nats, float64."""
        mix = MixtureSameFamily(Categorical(probs=self.weights),
                                MultivariateNormal(self.means, scale_tril=self.scale_tril))
        return mix.log_prob(z.detach().double().cpu())

    def to_tensors(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}


def normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per row of z (B, d), in nats, float64."""
    z = z.detach().double().cpu()
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))


def draw_latents(prior: str, generators: Sequence[torch.Generator], z_dim: int,
                 mixture: GaussianMixture | None, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, z_dim) latents from ``prior`` ("normal" or "gmm"), row b from ``generators[b]``."""
    if prior == "normal":
        return randn_like_per_sample(generators, (z_dim,), device, dtype)
    return checked_mixture(prior, mixture, z_dim).sample(generators, device, dtype)


def checked_mixture(prior: str, mixture: GaussianMixture | None,
                    z_dim: int) -> GaussianMixture | None:
    """The mixture that ``prior`` names (None for "normal"), checked against the VAE's z."""
    if prior not in PRIORS:
        raise ConfigError(f"prior must be one of {', '.join(PRIORS)}; got {prior!r}")
    if prior == "normal":
        return None
    if mixture is None:
        raise ConfigError("this run has no fitted latent prior; fit one with "
                          "`diffusevae fit-prior` (with `components` K), or use the normal `prior`")
    if mixture.z_dim != z_dim:
        raise ConfigError(f"the fitted prior is {mixture.z_dim}-dimensional but the VAE's z has "
                          f"{z_dim} dimensions; refit it with `diffusevae fit-prior`")
    return mixture


# --------------------------------------------------------------------------------------------
# Fitting the mixture
# --------------------------------------------------------------------------------------------

def fit_mixture(z: Tensor, components: int, seed: int = 0,
                reg_covar: float = 1e-6, max_iter: int = 200) -> tuple[GaussianMixture, dict]:
    """Fit a full-covariance Gaussian mixture to latents (N, d) with scikit-learn's EM.

    Returns the mixture and a small report (converged, iterations).
    """
    # Imported here, not at the top: every command imports this module (for sampling), and
    # importing scikit-learn took a third of `import diffusevae` when measured; only fitting
    # needs it.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    if components < 1:
        raise ConfigError(f"`components` must be >= 1; got {components}")
    if len(z) < 2 * components:
        raise ConfigError(f"cannot fit {components} components to {len(z)} latents; use fewer "
                          "components or more images (`max_images`)")
    gmm = SkGaussianMixture(n_components=components, covariance_type="full",
                            reg_covar=reg_covar, max_iter=max_iter,
                            random_state=rng.derived_seed(seed, rng.LIBRARY, _SKLEARN, bits=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the result instead
        gmm.fit(z.double().numpy())
    mixture = GaussianMixture(torch.from_numpy(gmm.weights_), torch.from_numpy(gmm.means_),
                              torch.from_numpy(gmm.covariances_))
    return mixture, {"converged": bool(gmm.converged_), "iterations": int(gmm.n_iter_)}


def loglik_per_dim(mixture: GaussianMixture | None, z: Tensor) -> float:
    """Mean log-likelihood per dimension (nats) of latents z (N, d): the mixture's or N(0, I)'s."""
    lp = normal_log_prob(z) if mixture is None else mixture.log_prob(z)
    return float(lp.mean()) / z.shape[1]


# --------------------------------------------------------------------------------------------
# The prior folder of a run
# --------------------------------------------------------------------------------------------









