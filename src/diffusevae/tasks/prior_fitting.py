"""Fitting Ex-PDE for a run (`fit-prior`): encode its training set, fit the Gaussian mixture
(`diffusevae.core.prior.fit_mixture`), report its held-out log-likelihood, write ``RUN/prior``.

Latents are encoded as posterior samples z ~ q(z|x) by default (the aggregate posterior, which
is what the refiner was trained on), or as the means mu(x); image i's noise comes from its own
generator, so the latents do not depend on the batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .. import rng
from ..core.prior import fit_mixture, loglik_per_dim
from ..core.vae import VAE
from ..io.data import build_dataset
from ..io.storage import sha256_file
from ..model.prior_files import save_mixture
from ..model.run_folder import RunFolder
from ..rng import randn_like_per_sample

HELDOUT_FRACTION = 0.1  # of the images held out when the dataset has no test split


def subset_indices(n: int, max_images: int | None, seed: int) -> list[int]:
    """All of 0..n-1, or a seeded random subset of ``max_images`` of them, in ascending order."""
    if max_images is None or max_images >= n:
        return list(range(n))
    perm = torch.randperm(n, generator=rng.generator(seed, rng.SUBSET))
    return sorted(perm[:max_images].tolist())


@torch.inference_mode()
def encode_dataset(vae: VAE, dataset: Dataset, indices: Sequence[int], use_mean: bool = False,
                   seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
                   purpose: int = rng.SAMPLE) -> tuple[Tensor, Tensor]:
    """Latents (N, d) float32 and labels (N,) of ``dataset[indices]``, on the CPU.

    ``use_mean``: z = mu(x); else z ~ q(z|x), image i's noise from the generator of
    (seed, purpose, i), so the latents do not depend on the batch size (another `purpose`,
    rng.HELDOUT, gives a second set of images noise of its own).
    """
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False)
    zs, labels, done = [], [], 0
    for x, y in loader:
        mu, logvar = vae.encode(x.to(device))  # (B, d) each
        z = mu
        if not use_mean:
            gens = [rng.generator(seed, purpose, int(i)) for i in indices[done:done + len(x)]]
            eps = randn_like_per_sample(gens, (mu.shape[1],), mu.device, mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        zs.append(z.float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
        done += len(x)
    return torch.cat(zs), torch.cat(labels)


def fit_prior(run_dir: str | Path, components: int, use_mean: bool = False,
              max_images: int | None = None, seed: int = 0,
              device: torch.device | str = "cpu", batch_size: int = 256) -> dict:
    """Ex-PDE for a run: encode its training set, fit the mixture, write ``RUN/prior/``.

    The report (also in ``prior.json``) gives the held-out log-likelihood per dimension of the
    mixture next to N(0, I)'s, on the test split's latents (or on the last 10% of the images
    when the dataset has no test split).
    """
    run = RunFolder(run_dir)
    run.require_writable("fit-prior")
    with run.writing("prior", "fit-prior"):  # one writer of RUN/prior at a time
        vae = run.load_vae(device)
        data = run.training_data()
        train = build_dataset(data, "train")
        if data.dataset == "folder":  # no test split: hold out the last 10% of the images
            n_held = max(1, int(len(train) * HELDOUT_FRACTION))
            train_idx = subset_indices(len(train) - n_held, max_images, seed)
            held, held_idx = train, list(range(len(train) - n_held, len(train)))
            held_name = f"the last {n_held} images of the folder"
        else:
            train_idx = subset_indices(len(train), max_images, seed)
            held = build_dataset(data, "test")
            held_idx = subset_indices(len(held), max_images, seed)
            held_name = f"{len(held_idx)} images of the {data.dataset} test split"
        z_train, _ = encode_dataset(vae, train, train_idx, use_mean, seed, batch_size, device)
        z_held, _ = encode_dataset(vae, held, held_idx, use_mean, seed, batch_size, device,
                                   purpose=rng.HELDOUT)
        mixture, fit_info = fit_mixture(z_train, components, seed)
        report = {
            "latents": "means" if use_mean else "posterior samples",
            "train_images": len(train_idx), "heldout": held_name, "seed": seed, **fit_info,
            "loglik_per_dim": {  # nats per latent dimension; higher is better
                "gmm_heldout": round(loglik_per_dim(mixture, z_held), 4),
                "normal_heldout": round(loglik_per_dim(None, z_held), 4),
                "gmm_train": round(loglik_per_dim(mixture, z_train), 4),
            },
            "vae_sha256": sha256_file(run.weights_file("vae")),
        }
        save_mixture(run.prior_dir, mixture, report)
        return {"components": components, "z_dim": mixture.z_dim, **report, "folder": run.prior_dir}
