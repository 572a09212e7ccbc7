"""A run's prior folder on disk: the Ex-PDE mixture as arrays (``gmm.safetensors``: weights,
means, covariances, float64) plus ``prior.json`` (settings and the fit report). Nothing is
pickled; a mixture fitted to an earlier version of the run's VAE is warned about when read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..core.prior import GaussianMixture, checked_mixture
from ..errors import CheckpointError
from ..io.checkpoint import atomic_save_tensors, load_tensors
from ..io.reading import read_json
from ..io.storage import atomic_write_json, sha256_file
from ..filenames import GMM_FILE, PRIOR_JSON
from .run_folder import RunFolder



def save_mixture(folder: str | Path, mixture: GaussianMixture, info: dict) -> None:
    """Write ``gmm.safetensors`` and then ``prior.json`` (kind, shapes, `info`)."""
    folder = Path(folder)
    atomic_save_tensors(folder / GMM_FILE, mixture.to_tensors())
    atomic_write_json(folder / PRIOR_JSON, {"kind": "gmm", "components": mixture.n_components,
                                            "z_dim": mixture.z_dim, **info})


def load_mixture(folder: str | Path) -> tuple[GaussianMixture, dict]:
    """The mixture of a prior folder and its ``prior.json``, or a CheckpointError naming it."""
    folder = Path(folder)
    meta = read_json(folder / PRIOR_JSON, "the prior record", {"kind": str},
                     fix="refit the prior with `diffusevae fit-prior`")
    if meta["kind"] != "gmm":
        raise CheckpointError(f"{folder / PRIOR_JSON} is not a Gaussian-mixture prior")
    arrays = load_tensors(folder / GMM_FILE)
    try:
        return GaussianMixture(arrays["weights"], arrays["means"], arrays["covariances"]), meta
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{folder / GMM_FILE} is not a valid mixture ({exc}); refit it "
                              "with `diffusevae fit-prior`") from None


def run_mixture(run_dir: str | Path, prior: str, z_dim: int) -> GaussianMixture | None:
    """The run's mixture that ``prior`` names (None for "normal"; read only for "gmm"),
    checked against the VAE's z (`checked_mixture`)."""
    return checked_mixture(prior, load_run_prior(run_dir) if prior == "gmm" else None, z_dim)


def load_run_prior(run_dir: str | Path) -> GaussianMixture | None:
    """The run's fitted mixture (``RUN/prior``), or None; warns if the VAE changed since."""
    run = RunFolder(run_dir)
    folder = run.prior_dir
    if not (folder / PRIOR_JSON).is_file():
        return None
    mixture, meta = load_mixture(folder)
    weights = run.weights_file("vae")
    if meta.get("vae_sha256") and weights.is_file() and sha256_file(weights) != meta["vae_sha256"]:
        warnings.warn(f"{folder} was fitted to an earlier version of the run's VAE; refit it with "
                      f"`diffusevae fit-prior` on {run_dir}", stacklevel=2)
    return mixture
