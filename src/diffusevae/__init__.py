"""DiffuseVAE: a VAE gives a coarse image from a small latent z; a conditional DDPM refines it.

The package's wings, from the bottom up: config.py, filenames.py, names.py, limits.py,
version.py, errors.py, rng.py and distributed.py are used by everything; `io` reads and writes
files (presets.py sits just above it); `core` holds the mathematics and the networks; `official`
the published checkpoints; `model` a trained model and `DiffuseVAE`; `train` the two training
stages; `scoring` FID and its kin; `tasks` what the commands produce; `app` the explorer;
`cli` the command line.
"""

from .version import __version__  # noqa: E402,F401
from .config import Config, InvertConfig, SampleConfig  # noqa: E402
from .core.unet import UNet  # noqa: E402
from .core.vae import VAE  # noqa: E402
from .model.pipeline import DiffuseVAE, Generation, Inversion  # noqa: E402
from .presets import get_preset, resolve  # noqa: E402

__all__ = ["Config", "DiffuseVAE", "Generation", "InvertConfig", "Inversion", "SampleConfig",
           "UNet", "VAE", "get_preset", "resolve", "__version__"]
