"""Bounds on what a user can hand a command, each stated once: counts, sizes, floats, seeds, and
the size and nesting of the JSON and YAML files a command reads, and the arrays of its .npz files.

Every bound is far beyond any real use, and small enough that no index, size or allocation
derived from it overflows. The config classes check them (config.py), the command line's types
are built from them (cli/options.py), and the library functions that take such a value from a
caller check it too (latents.check_lambdas, rng.generator). JSON and YAML are parsed with
limits on size, nesting and (YAML) aliases expanded, so that a hostile file is refused in one
line instead of exhausting memory or the stack. Pure Python: importing it costs nothing.
"""

from __future__ import annotations

import numbers
from typing import Any

from .errors import ConfigError, quote


# --------------------------------------------------------------------------------------------
# Counts, sizes, floats and seeds
# --------------------------------------------------------------------------------------------

SEED_MAX = 2**64 - 1  # a seed: what torch's generators take; rng.py uses all 64 bits
SEED_WORDS = "an integer from 0 to 2^64 - 1"  # the range of a seed, in words
MAX_SAMPLES = 10**8  # images one command draws, scores or writes (sample.n): 10^8
MAX_BATCH = 65_536  # images in one batch
MAX_OPTIMISER_STEPS = 10**9  # optimiser steps (training), and the intervals counted in them
MAX_EPOCHS = 10**6
MAX_TIMESTEPS = 100_000  # the diffusion's T, so also sampling and inversion steps
MAX_IMAGE_SIZE = 4096  # pixels a side
MAX_WIDTH = 65_536  # channels of a layer, dimensions of z
MAX_LEVELS = 12  # resolutions of the UNet (channel_mults), blocks per level
MAX_VAE_BLOCKS = 1024  # residual blocks of one VAE stack (the paper's largest has ~60)
MAX_WORKERS = 256  # data-loading processes
MAX_MINUTES = 10**7  # train.time_limit (19 years)
MAX_LR = 10.0  # a learning rate beyond it only diverges
MAX_TEMPERATURE = 10.0  # the initial noise's scale: beyond it the refiner sees no image
MAX_ETA = 1.0  # DDIM's eta: 0 deterministic, 1 DDPM's variance (Song et al. 2021, eq. 16)
MAX_GUIDANCE = 100.0  # classifier-free guidance weight w
MAX_SNR_GAMMA = 1e4  # Min-SNR-gamma: past it every timestep of a linear schedule keeps weight 1
MAX_FIXED_POINT = 1000  # fixed-point iterations per inversion step (10-20 are plenty)
MAX_LAMBDA = 100.0  # |lambda| of an edit z + lambda d (1: the whole gap between two groups)
MAX_LAMBDAS = 64  # lambdas of one edit (the columns of its grids)
MAX_EDIT_IMAGES = 4096  # images x lambdas of one edit, all held in memory for its grids
MAX_FRAMES = 1000  # frames of an interpolation, all held in memory for its GIF
MAX_COMPONENTS = 1024  # components of the Ex-PDE mixture prior
MAX_KEPT = 200_000  # features kept per set for KID (memory: this x the feature width)
MAX_SUBSETS = 10_000  # KID subsets, IS splits
MAX_THREADS = 1024
MAX_CLASSIFIER_WIDTH = 1024  # channels of the evaluation classifier's first block


def check_seed(seed: Any, what: str = "seed") -> int:
    """`seed` if it is an integer the generators take whole, [0, 2^64 - 1], else a ConfigError."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) \
            or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{what} must be {SEED_WORDS} = {SEED_MAX}; got {quote(seed)}")
    return int(seed)


# Text files a command reads (the readers: diffusevae.io.text)
MAX_TEXT_BYTES = 16 * 2**20  # a JSON or YAML file a command reads (configs, records, manifests)
MAX_NESTING = 64  # levels of lists and mappings in one
MAX_YAML_VALUES = 100_000  # values of a YAML document, counted with its aliases expanded

# Arrays a command reads (the reader: diffusevae.io.arrays)
MAX_ARRAY_BYTES = 16 * 2**30  # one array of an .npz that a command loads whole (latents, stats)
MAX_ARRAY_RANK = 8  # dimensions of one (images: 4)
MAX_NPZ_MEMBERS = 64  # arrays in one .npz (diffusevae writes at most 5)
