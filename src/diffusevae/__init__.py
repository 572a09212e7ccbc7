"""DiffuseVAE: a VAE gives a coarse image from a small latent z; a conditional DDPM refines it."""

__version__ = "0.1.0"
