"""The names a config field can take, each list declared once.

`config.py` checks its fields against these lists, the command line's ``click.Choice`` options
list them, and each module that implements the names maps them to what they name, checked when
that module is imported (`check_registry`). They live here, below `config`, because a config is
checked without importing torch or a network: the implementations (layer 2) import the config,
never the other way round. Lists that no config field takes live with their owner instead
(`core.prior.PRIORS`, `scoring.features.EXTRACTORS`, `tasks.control.MODES`).

To add a sampler: write it in core/samplers.py, add it to `samplers.SAMPLERS` and its name here;
the config and the command line accept it from then on.
"""

from __future__ import annotations

from typing import Iterable

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "folder")  # data.build_dataset
FORMS = ("uncond", "form1", "form2", "form2-official")  # diffusion.FORMULATIONS
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc")  # samplers.SAMPLERS
SPACINGS = ("uniform", "trailing", "quad")  # diffusion.respaced_timesteps
VAR_TYPES = ("fixedlarge", "fixedsmall")  # samplers.ddpm's step variance
PRECISIONS = ("no", "fp16", "bf16")  # mixed precision of training
LR_SCHEDULES = ("constant", "cosine", "linear")  # training_loop.learning_rate
DEVICES = ("auto", "cpu", "cuda", "mps")  # distributed.resolve_device


def check_registry(what: str, implemented: Iterable[str], declared: tuple[str, ...]) -> None:
    """Fail at import when a module implements other names than the ones declared here."""
    if tuple(implemented) != declared:
        raise ImportError(f"{what} implements {tuple(implemented)} but names.py declares "
                          f"{declared}; add or remove the name in both places, in one order")
