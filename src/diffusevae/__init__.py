"""DiffuseVAE: a VAE gives a coarse image from a small latent z; a conditional DDPM refines it."""

__version__ = "0.1.0"

from .config import Config, get_preset, resolve  # noqa: E402
from .pipeline import DiffuseVAE, Generation  # noqa: E402
from .unet import UNet  # noqa: E402
from .vae import VAE  # noqa: E402

__all__ = ["Config", "DiffuseVAE", "Generation", "UNet", "VAE", "get_preset", "resolve",
           "__version__"]
