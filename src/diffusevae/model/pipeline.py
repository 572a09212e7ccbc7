"""DiffuseVAE as one object: the VAE gives x_hat = D(z), the refiner turns it into a sharp image.

A trained DiffuseVAE is one folder holding ``vae/`` and ``refiner/`` (each ``config.json`` +
safetensors); the refiner never stores a copy of the VAE, and ``prior/`` when an Ex-PDE mixture
was fitted (core/prior.py). Sampling streams batches, and every sample depends only on the seed and
its index: sample i draws its z, its initial noise and its per-step noise from its own generator,
so batch size never changes an image.

Beyond sampling, the same refiner turns any x_hat into an image: a real image's reconstruction
(`reconstruct`), a coarse image the user gives (`refine_images`), optionally starting, SDEdit
style, from the image itself noised to an intermediate step (`initial_state`). `invert` encodes
a real image to (z, y_T), from which `decode_latents` gives it back almost exactly.

How fast the refiner runs is the pipeline's own state, set by `compile` and `use_channels_last`
or by the `SampleConfig` fields of the same names at the next `refine`; neither changes an
image beyond float rounding (docs/sampling.md, "Fast sampling"). `from_pretrained` picks the
faster memory layout for the device; a pipeline built around a given UNet leaves that UNet as it
is (it may be a model in training) until asked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch

from ..config import DiffusionConfig, SampleConfig, with_settings
from ..core.diffusion import Schedule, get_formulation, make_eps_fn, q_sample, respaced_timesteps
from ..core.likelihood import LikelihoodBound, likelihood_bound
from ..core.prior import GaussianMixture, checked_mixture, draw_latents
from ..core.samplers import ddim_invert, get_sampler, sampler_options
from ..core.unet import CHANNELS_LAST_DEVICES, UNet
from ..core.vae import VAE
from ..errors import CheckpointError, ConfigError
from ..io.arrays import Want, read_npz
from ..io.reading import parse_checked
from ..io.storage import atomic_write
from ..rng import randn_like_per_sample, sample_generators
from .prior_files import load_run_prior, save_mixture
from .run_folder import RunFolder, save_refiner
from .sampling_defaults import SamplingDefaults, read_sampling_defaults, write_sampling_defaults


def _has_cpp_compiler() -> bool:
    """Whether torch.compile's default backend can build CPU code here."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++"))


@dataclass
class Generation:
    """A batch of generated images in [-1, 1] (B, C, H, W), with the z and x_hat behind them."""

    images: torch.Tensor
    z: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None


@dataclass
class Inversion:
    """Real images encoded by `DiffuseVAE.invert`: the sampler's first state y_T (B, C, H, W)
    (the paper's x_T in the coordinate y of docs/method.md#shifted-coordinate, N(0, I)-like in
    every formulation), with z = mu(x) and x_hat = D(z) (None without a VAE)."""

    y_T: torch.Tensor
    z: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None

    DECODE_FIELDS: ClassVar[tuple[str, ...]] = ("steps", "spacing", "guidance", "clip")
    """The `SampleConfig` fields that must equal the inversion's for decoding to return x."""
    ARRAYS: ClassVar[dict[str, Want]] = {"y_T": Want("f", 4, rows=True),
                                         "z": Want("f", 2, required=False),
                                         "meta": Want("U", 0)}
    """The arrays of a latents file (`io.arrays.read_npz` checks them as it reads)."""

    def save(self, path: str | Path, sample: SampleConfig, **info) -> None:
        """Write z and y_T to an `.npz` (arrays only), with the settings that decode them
        (`DECODE_FIELDS` of ``sample``) and ``info`` as JSON; x_hat is D(z) again on loading."""
        meta = {"decode": {k: getattr(sample, k) for k in self.DECODE_FIELDS}, **info}
        arrays = {"y_T": self.y_T.float().cpu().numpy(), "meta": np.array(json.dumps(meta))}
        if self.z is not None:
            arrays["z"] = self.z.float().cpu().numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> tuple["Inversion", dict]:
        """The latents of `save` (without x_hat), and its settings: ``meta["decode"]`` are the
        `SampleConfig` fields to decode them with."""
        fix = "write it again with `invert` and `save_latents`"
        arrays = read_npz(path, cls.ARRAYS, "the latents file (of `save_latents`)", ConfigError,
                          fix)
        meta = parse_checked(str(arrays["meta"]), f"{path}:meta", {"decode": dict},
                             ConfigError, fix)
        # as the networks' float32 (floats of another width or byte order are read as such)
        y_T, z = (None if a is None else torch.from_numpy(a.astype(np.float32))
                  for a in (arrays["y_T"], arrays.get("z")))
        if set(meta["decode"]) != set(cls.DECODE_FIELDS) or (z is not None and len(z) != len(y_T)):
            raise ConfigError(f"{path} does not hold the latents of `save_latents` (z, y_T and "
                              f"their settings, one z a y_T); {fix}")
        return cls(y_T, z), meta


# The sampler settings that decode an inversion: deterministic DDIM with the eps of the clipped
# prediction, the chain the inversion ran back.
INVERSION_SAMPLER = {"sampler": "ddim", "eta": 0.0, "keep_eps": False}


def check_decodes_inversion(sample: SampleConfig) -> None:
    """Refuse sampler settings that do not decode an inversion back to its images
    (`INVERSION_SAMPLER`)."""
    if any(getattr(sample, k) != v for k, v in INVERSION_SAMPLER.items()):
        raise ConfigError("inversion runs deterministic DDIM backwards, and only that decodes "
                          f"back to the input; got sampler {sample.sampler} with eta "
                          f"{sample.eta:g}{' and sample.keep_eps' * sample.keep_eps}: use "
                          "sample.sampler ddim, sample.eta 0 and sample.keep_eps off")


# --------------------------------------------------------------------------------------------
# Non-finite output is never handed on: the first batch with nan or inf stops the command
# --------------------------------------------------------------------------------------------

def _broken(nets: dict[str, torch.nn.Module | None]) -> list[str]:
    """The names of the networks whose weights or buffers hold nan or inf."""
    return [name for name, net in nets.items() if net is not None and not all(
        bool(torch.isfinite(v).all()) for v in net.state_dict().values()
        if v.is_floating_point())]


# Sampling settings beyond these are the likely cause of non-finite images (when the weights
# are finite); within them the weights are.
ORDINARY_SETTINGS = {"temperature": 2.0, "eta": 1.0, "guidance": 20.0}


def check_finite(t: torch.Tensor, what: str, nets: dict[str, torch.nn.Module | None],
                 source: str | Path | None = None,
                 settings: dict[str, float] | None = None) -> torch.Tensor:
    """`t` itself when it is finite; else the error naming the likely cause: weights of one
    of `nets` that hold nan or inf, else sampling `settings` beyond `ORDINARY_SETTINGS`, else
    weights that overflow. Callers check each batch before they write it, so nothing
    non-finite is ever written."""
    if bool(torch.isfinite(t).all()):
        return t
    where = f" of {source}" if source is not None else ""
    broken = _broken(nets)
    if broken:
        raise CheckpointError(f"the {what} are not finite (nan or inf) because the "
                              f"{' and '.join(broken)} weights{where} hold non-finite values; "
                              "nothing was written for them: retrain, or restore the run "
                              "from an intact copy")
    settings = settings or {}
    extreme = {k: v for k, v in settings.items()
               if not abs(v) <= ORDINARY_SETTINGS.get(k, math.inf)}
    if extreme:
        used = ", ".join(f"{k} {v:g}" for k, v in extreme.items())
        raise ConfigError(f"the {what} are not finite (nan or inf) with {used}; nothing was "
                          "written for them: values this extreme make garbage, use ones "
                          "nearer the defaults (temperature 1, eta 0 to 1, guidance 0 to 10)")
    used = "".join(f", {k} {v:g}" for k, v in settings.items())
    raise CheckpointError(f"the {what} are not finite (nan or inf) with ordinary inputs"
                          f"{used}: the network weights{where} are finite but overflow, so "
                          "the model is broken; nothing was written for them: retrain, or "
                          "restore the run from an intact copy")


class DiffuseVAE:
    """The two stages together: ``generate`` samples z, decodes x_hat and refines it.

    ``prior``: the Ex-PDE mixture over z, if one was fitted; ``generate(prior="gmm")`` uses it.
    ``defaults``: the settings and prior `generate` uses where it is not given them (a run's
    ``sampling_defaults.json``, model/sampling_defaults.py; none: `SampleConfig`'s, N(0, I)).
    """

    def __init__(self, vae: VAE | None, unet: UNet, diffusion: DiffusionConfig,
                 prior: GaussianMixture | None = None,
                 defaults: SamplingDefaults | None = None):
        self.form = get_formulation(diffusion.form)
        if self.form.uses_vae and vae is None:
            raise ConfigError(f"the {diffusion.form} refiner needs a VAE, and none was given")
        self.vae = vae if self.form.uses_vae else None
        self.unet = unet
        self.diffusion = diffusion
        self.schedule = Schedule.from_config(diffusion)
        if prior is not None and (self.vae is None or prior.z_dim != self.vae.config.z_dim):
            raise ConfigError("the latent prior does not fit this pipeline's VAE (no VAE, or "
                              "another z size); refit it with `diffusevae fit-prior`")
        self.prior = prior
        self.defaults = defaults or SamplingDefaults()
        self.source: Path | None = None  # the run folder it was loaded from, for messages
        self.compiled = False  # `compile` was called
        self.channels_last: bool | None = None  # the UNet's layout; None: as it was given

    # ---- folders --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path, use_ema: bool = True,
                        device: str | torch.device = "cpu",
                        channels_last: bool | None = None) -> "DiffuseVAE":
        """Load ``folder/refiner``, ``folder/vae`` when the formulation needs one, and
        ``folder/prior`` when an Ex-PDE mixture was fitted, and the sampling defaults it records;
        the refiner's memory layout as `use_channels_last` chooses (None: by device).
        ``folder``: a path or a `RunFolder`."""
        run = RunFolder(folder)
        vae, unet, diffusion = run.load_models(device, use_ema)
        pipe = cls(vae, unet, diffusion, load_run_prior(run) if vae is not None else None,
                   read_sampling_defaults(run.root))
        pipe.source = run.root
        return pipe.use_channels_last(channels_last)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``folder/vae`` (if any), ``folder/refiner``, ``folder/prior`` (if any) and
        the sampling defaults (unless they are the library's), the layout of a run folder."""
        run = RunFolder(folder)
        if self.vae is not None:
            self.vae.save_pretrained(run.vae_dir)
        save_refiner(run.refiner_dir, self.unet, None, self.diffusion)
        if self.prior is not None:
            save_mixture(run.prior_dir, self.prior, {})
        if self.defaults != SamplingDefaults():
            write_sampling_defaults(run.root, self.defaults)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.channels, c.image_size, c.image_size)

    def _finite(self, t: torch.Tensor, what: str,
                sample: SampleConfig | None = None) -> torch.Tensor:
        """`t`, or the error naming why it is not finite (`check_finite`)."""
        settings = None if sample is None else {
            "temperature": sample.temperature, "eta": sample.eta, "guidance": sample.guidance}
        return check_finite(t, what, {"refiner": self.unet, "VAE": self.vae}, self.source,
                            settings)

    # ---- how fast the refiner runs ----------------------------------------------------------

    def compile(self, **kwargs) -> "DiffuseVAE":
        """Compile the refiner UNet in place with torch.compile; returns self.

        `nn.Module.compile`: the UNet keeps its class and its state-dict keys, so saving and
        loading are unchanged. ``kwargs`` go to torch.compile, with ``dynamic=False`` unless
        given: one graph per batch shape, so a run of equal batches and a smaller last one
        compiles twice (the first batch of each shape is slow) and never again; torch runs
        shapes beyond ``torch._dynamo.config.recompile_limit`` eagerly. Call it again to
        compile with other options.
        """
        inductor = kwargs.get("backend", "inductor") == "inductor"
        if inductor and self.device.type == "cpu" and not _has_cpp_compiler():
            raise ConfigError("torch.compile for the CPU needs a C++ compiler (g++ or clang++, or "
                              "one named by $CXX); install one, or sample with sample.compile off")
        self.unet.compile(**{"dynamic": False, **kwargs})
        self.compiled = True
        return self

    def use_channels_last(self, enabled: bool | None = None) -> "DiffuseVAE":
        """Lay the refiner's weights, and the input of each call, out channels-last (NHWC), or
        back to contiguous (NCHW) with False; returns self.

        None chooses by device: channels-last on CHANNELS_LAST_DEVICES, where its convolutions
        are faster, contiguous elsewhere. Images agree to float rounding either way.
        """
        if enabled is None:
            enabled = self.device.type in CHANNELS_LAST_DEVICES
        if enabled != self.channels_last:
            fmt = torch.channels_last if enabled else torch.contiguous_format
            with torch.inference_mode(False):  # weights, not inference tensors: still trainable
                self.unet.to(memory_format=fmt)
            self.channels_last = enabled
        return self

    def _network(self) -> Callable:
        """The refiner as the samplers call it: ``(x_in, t, z=None) -> eps``, its input laid
        out as its weights are."""
        if not self.channels_last:
            return self.unet

        def network(x_in: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None):
            return self.unet(x_in.contiguous(memory_format=torch.channels_last), t, z)

        return network

    def _run_as(self, sample: SampleConfig) -> None:
        """Apply ``sample.channels_last`` (None keeps the pipeline's layout) and
        ``sample.compile`` (a compiled pipeline stays compiled)."""
        if sample.channels_last is not None:
            self.use_channels_last(sample.channels_last)
        if sample.compile and not self.compiled:
            self.compile()

    # ---- the core: refine a batch of x_hat --------------------------------------------------

    def check_guidance(self, guidance: float) -> None:
        """Refuse a guidance weight this refiner cannot use (before any work is done)."""
        if guidance > 0 and (not self.form.conditioned or self.diffusion.p_uncond == 0):
            raise ConfigError(
                "guidance needs a refiner trained with conditioning dropout; this one has "
                f"form={self.diffusion.form}, p_uncond={self.diffusion.p_uncond}. Retrain with "
                "diffusion.p_uncond 0.1 (for example), or sample with sample.guidance 0"
            )

    @torch.inference_mode()
    def initial_state(self, generators: list[torch.Generator], sample: SampleConfig,
                      x_hat: torch.Tensor | None = None, x_start: torch.Tensor | None = None,
                      start_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's first state (B, C, H, W) and its ascending original timesteps.

        Fresh noise: y_T = temperature * eps over all respaced steps. SDEdit (Meng et al. 2022)
        with ``start_step`` t: the chain starts at the respaced step tau_k nearest t, from
        y = q_sample(target(x_start, x_hat), tau_k, temperature * eps), and visits tau_k..tau_1,
        so the image keeps x_start's layout and the refiner redraws the details.
        """
        device, dtype = self.device, next(self.unet.parameters()).dtype
        eps = sample.temperature * randn_like_per_sample(generators, self.image_shape,
                                                         device, dtype)
        timesteps = respaced_timesteps(self.diffusion.timesteps, sample.steps, sample.spacing)
        if start_step is None:
            return eps, timesteps
        if not 0 <= start_step < self.diffusion.timesteps:
            raise ConfigError(f"`start_step` must be in 0..{self.diffusion.timesteps - 1}; got "
                              f"{start_step}")
        if x_start is None:
            raise ValueError("a start step needs x_start, the image to noise")
        k = int((timesteps - start_step).abs().argmin())  # the respaced step nearest t
        timesteps = timesteps[: k + 1]
        y0 = self.form.target(x_start.to(device=device, dtype=dtype), x_hat)
        return q_sample(self.schedule, y0, int(timesteps[-1]), eps), timesteps

    @torch.inference_mode()
    def refine(self, x_hat: torch.Tensor | None, z: torch.Tensor | None,
               generators: list[torch.Generator], sample: SampleConfig,
               callback: Callable | None = None, y_T: torch.Tensor | None = None,
               timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Run the sampler conditioned on `x_hat` (and `z`); images in [-1, 1].

        From fresh noise, or from a given first state ``y_T`` over ``timesteps`` (default: all
        respaced steps), e.g. one made by `initial_state` or an interpolated noise.
        """
        sample.validate(self.diffusion.timesteps)
        self.check_guidance(sample.guidance)
        self._run_as(sample)
        if y_T is None:
            y_T, timesteps = self.initial_state(generators, sample)
        elif timesteps is None:
            timesteps = respaced_timesteps(self.diffusion.timesteps, sample.steps, sample.spacing)
        options = {k: getattr(sample, k) for k in sampler_options(sample.sampler)}
        y0 = get_sampler(sample.sampler)(
            self._eps_fn(x_hat, z, sample.guidance), y_T, self.schedule, timesteps,
            generators=generators, clip_fn=self.form.clip_fn(x_hat) if sample.clip else None,
            callback=callback, **options)
        return self._finite(self.form.readback(y0, x_hat), "images", sample).clamp(-1, 1)

    def _eps_fn(self, x_hat: torch.Tensor | None, z: torch.Tensor | None, guidance: float):
        """The refiner as the samplers' noise predictor, given x_hat and (if it takes one) z."""
        return make_eps_fn(self._network(), self.form, x_hat,
                           z if self.unet.config.z_dim else None, guidance)

    # ---- refining given images --------------------------------------------------------------

    def _need_vae(self, what: str) -> VAE:
        if self.vae is None:
            raise ConfigError(f"{what} needs a VAE, and this run's refiner ({self.diffusion.form}) "
                              "has none; use a run trained with diffusion.form form2 (or form1)")
        return self.vae

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = mu(x) (B, z_dim), the VAE's posterior mean of images in [-1, 1]."""
        mu, _ = self._need_vae("encoding images").encode(x.to(self.device))
        return self._finite(mu, "latents z of the images")

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = D(z) (B, C, H, W), clamped to [-1, 1]."""
        vae = self._need_vae("decoding z")
        if not bool(torch.isfinite(z).all()):
            raise ConfigError("the latents z to decode hold nan or inf (from an extreme "
                              "lambda, or a broken latents file or prior?); nothing was "
                              "written for them")
        return self._finite(vae.decode(z.to(self.device)), "VAE decodings x_hat").clamp(-1, 1)

    @torch.inference_mode()
    def refine_images(self, x_hat: torch.Tensor, sample: SampleConfig,
                      z: torch.Tensor | None = None, x_start: torch.Tensor | None = None,
                      start_step: int | None = None, first_index: int = 0,
                      callback: Callable | None = None) -> Generation:
        """Refine given coarse images x_hat (B, C, H, W) in [-1, 1], image i with the noise of
        (sample.seed, first_index + i).

        ``z`` defaults to mu(x_hat) (what a z-conditioned refiner needs). With ``start_step``
        the chain starts SDEdit style from ``x_start`` (default: x_hat itself) noised to that
        step. An unconditional refiner ignores x_hat and can only do the latter.
        """
        x_hat = x_hat.to(self.device)
        if tuple(x_hat.shape[1:]) != self.image_shape:
            raise ConfigError(f"the refiner takes images of shape {self.image_shape}; got "
                              f"{tuple(x_hat.shape[1:])}")
        gens = sample_generators(sample.seed, range(first_index, first_index + len(x_hat)))
        x_start = x_hat if x_start is None else x_start
        if self.vae is None:  # uncond: nothing to condition on, only the SDEdit start
            if start_step is None:
                raise ConfigError("this run's refiner is unconditional (form uncond): it cannot "
                                  "be conditioned on an image; give `start_step` t to start "
                                  "from the image noised to step t instead")
            y, taus = self.initial_state(gens, sample, None, x_start, start_step)
            return Generation(self.refine(None, None, gens, sample, callback, y, taus))
        z = self.encode(x_hat) if z is None else z.to(self.device)
        y = taus = None
        if start_step is not None:
            y, taus = self.initial_state(gens, sample, x_hat, x_start, start_step)
        images = self.refine(x_hat, z, gens, sample, callback, y, taus)
        return Generation(images, z, x_hat)

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, sample: SampleConfig, start_step: int | None = None,
                    first_index: int = 0, callback: Callable | None = None) -> Generation:
        """Encode real images x (z = mu), decode x_hat = D(z) and refine it; from fresh noise,
        or SDEdit style from x itself noised to ``start_step``."""
        z = self.encode(x)
        return self.refine_images(self.decode(z), sample, z, x.to(self.device), start_step,
                                  first_index, callback)

    # ---- inversion: real images to (z, y_T) and back (docs/method.md#inversion) -------------

    @torch.inference_mode()
    def invert(self, x: torch.Tensor, sample: SampleConfig, fixed_point: int = 0,
               tol: float = 0.0, callback: Callable | None = None) -> Inversion:
        """Encode real images x (B, C, H, W) in [-1, 1] to z = mu(x), x_hat = D(z) and y_T, the
        state from which DDIM on ``sample``'s steps, spacing, guidance and clipping returns x.

        Runs deterministic DDIM backwards (`ddim_invert`) with ``fixed_point`` iterations per
        step (stopping early per image below ``tol``); `decode_latents(z, y_T, sample)` decodes.
        An unconditional refiner inverts x itself (no z, no x_hat).
        """
        sample.validate(self.diffusion.timesteps)
        check_decodes_inversion(sample)
        self.check_guidance(sample.guidance)
        self._run_as(sample)
        x = x.to(device=self.device, dtype=next(self.unet.parameters()).dtype)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ConfigError(f"the refiner takes images of shape {self.image_shape}; got "
                              f"{tuple(x.shape[1:])}")
        z = x_hat = None
        if self.vae is not None:
            z = self.encode(x)
            x_hat = self.decode(z)
        timesteps = respaced_timesteps(self.diffusion.timesteps, sample.steps, sample.spacing)
        y_T = ddim_invert(self._eps_fn(x_hat, z, sample.guidance), self.form.target(x, x_hat),
                          self.schedule, timesteps,
                          clip_fn=self.form.clip_fn(x_hat) if sample.clip else None,
                          callback=callback, fixed_point=fixed_point, tol=tol)
        return Inversion(self._finite(y_T, "inverted first states y_T", sample), z, x_hat)

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor | None, y_T: torch.Tensor, sample: SampleConfig,
                       first_index: int = 0, callback: Callable | None = None) -> Generation:
        """Images from latents: x_hat = D(z), then the sampler from the first state y_T; image i
        with the noise of (sample.seed, first_index + i) if the sampler draws any.

        From an `invert` result with the same ``sample``: the inverted images; with another z
        (an edit, an interpolation): that z with the input's details. z is None without a VAE.
        """
        gens = sample_generators(sample.seed, range(first_index, first_index + len(y_T)))
        x_hat = None
        if self.vae is not None:
            if z is None:
                raise ConfigError("decoding latents of a DiffuseVAE needs z as well as y_T")
            z = z.to(self.device)
            x_hat = self.decode(z)
        y_T = y_T.to(device=self.device, dtype=next(self.unet.parameters()).dtype)
        return Generation(self.refine(x_hat, z, gens, sample, callback, y_T=y_T), z, x_hat)

    # ---- the likelihood bound (docs/likelihood.md) -------------------------------------------

    @torch.inference_mode()
    def log_likelihood_bound(self, x: torch.Tensor, *, seed: int = 0, first_index: int = 0,
                             prior: str = "normal", strata: int = 100, exact: bool = False,
                             var_type: str = "fixedlarge",
                             rate_samples: int = 16) -> LikelihoodBound:
        """The bound on log p(x) of 8-bit images x (B, C, H, W) in [-1, 1], per image and in
        parts (`likelihood.likelihood_bound`): z ~ q(z|x), x_hat = D(z) clamped as in training,
        the refiner's DDPM bound (``strata`` timesteps, or every one with ``exact``), minus
        KL(q(z|x) || p(z)) under ``prior`` ("normal", closed form, or "gmm", the fitted
        mixture, by Monte Carlo). Image i draws from the generator of (seed, first_index + i).
        Without a VAE (uncond): the plain DDPM bound, whatever ``prior``."""
        x = x.to(device=self.device, dtype=next(self.unet.parameters()).dtype)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ConfigError(f"the refiner takes images of shape {self.image_shape}; got "
                              f"{tuple(x.shape[1:])}")
        vae, mixture = self.vae, None
        if vae is not None:
            mixture = checked_mixture(prior, self.prior, vae.config.z_dim)
        return likelihood_bound(
            x, self.schedule, self.form, lambda x_hat, z: self._eps_fn(x_hat, z, 0.0),
            encode=None if vae is None else vae.encode,
            decode=None if vae is None else self.decode,
            log_prior=None if mixture is None else mixture.log_prob, seed=seed,
            first_index=first_index, strata=strata, exact=exact, var_type=var_type,
            rate_samples=rate_samples)

    # ---- generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def check_prior(self, prior: str, no_z_ok: bool = False) -> None:
        """Refuse, before any work, a prior of z this pipeline cannot draw from: "gmm" without a
        fitted mixture, or without a VAE unless ``no_z_ok`` (a sweep or an evaluation that
        includes the DDPM baseline, which draws no z whatever the prior)."""
        if prior != "normal" and not (no_z_ok and self.vae is None):
            self.draw_z([], prior)

    def draw_z(self, generators: list[torch.Generator], prior: str = "normal") -> torch.Tensor:
        """(B, z_dim) latents from the prior, row b from ``generators[b]`` ("normal" or "gmm")."""
        vae = self._need_vae("a latent z")
        z = draw_latents(prior, generators, vae.config.z_dim, self.prior, self.device)
        if not bool(torch.isfinite(z).all()):  # a mixture is checked when loaded: not expected
            raise CheckpointError(f"the latents drawn from the {prior} prior are not finite; "
                                  "refit it with `diffusevae fit-prior`")
        return z

    @torch.inference_mode()
    def iter_generate(self, sample: SampleConfig, start: int = 0,
                      callback: Callable | None = None,
                      prior: str = "normal") -> Iterator[tuple[int, Generation]]:
        """Yield ``(first_index, Generation)`` batch by batch for indices ``start..sample.n-1``.

        ``prior``: z ~ N(0, I) ("normal") or the fitted Ex-PDE mixture ("gmm").
        """
        self.check_prior(prior)  # fail before the first batch if there is no such prior
        for first in range(start, sample.n, sample.batch_size):
            indices = range(first, min(first + sample.batch_size, sample.n))
            yield first, self.generate_batch(sample, indices, callback, prior)

    @torch.inference_mode()
    def generate_batch(self, sample: SampleConfig, indices: range | list[int],
                       callback: Callable | None = None, prior: str = "normal") -> Generation:
        """The samples of the given global indices, drawn as one batch.

        Sample i comes from the generator of (sample.seed, i) alone, so any process can draw
        any batch; its pixels match another run's exactly when the batches match too (batched
        convolutions round differently), which is why `iter_generate` and distributed
        sampling both cut batches at multiples of ``sample.batch_size``.
        """
        gens = sample_generators(sample.seed, indices)
        z = x_hat = None
        if self.vae is not None:
            # z first from each sample's own generator, then the diffusion noise
            z = self.draw_z(gens, prior)
            x_hat = self.decode(z)
        images = self.refine(x_hat, z, gens, sample, callback)
        return Generation(images, z, x_hat)

    @torch.inference_mode()
    def generate(self, n: int | None = None, sample: SampleConfig | None = None, *,
                 prior: str | None = None, return_latents: bool = False,
                 **settings) -> Generation | torch.Tensor:
        """Generate images (B, C, H, W) in [-1, 1]; with `return_latents` also z and x_hat.

        How: ``sample`` (default: the run's sampling defaults, ``self.defaults``), with ``n``
        and any of its fields given as keywords in its place, e.g.
        ``generate(8, steps=20, sampler="dpmpp_2m")``. ``prior``: z ~ N(0, I) ("normal") or
        the run's fitted Ex-PDE mixture ("gmm"); default: the run's.
        """
        if n is not None or sample is None:  # without a config, n is required (None refused)
            settings["n"] = n
        sample = with_settings(sample or self.defaults.sample(), **settings)
        prior = self.defaults.prior if prior is None else prior
        parts = [g for _, g in self.iter_generate(sample, prior=prior)]
        out = Generation(
            images=torch.cat([p.images for p in parts]),
            z=None if parts[0].z is None else torch.cat([p.z for p in parts]),
            x_hat=None if parts[0].x_hat is None else torch.cat([p.x_hat for p in parts]),
        )
        return out if return_latents else out.images
