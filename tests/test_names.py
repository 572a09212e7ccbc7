"""The name registries: declared once (names.py), read by the config, the CLI and their owners."""

from __future__ import annotations

import click
import pytest

from diffusevae.scoring import features
from diffusevae.tasks import control as latents
from diffusevae import names
from diffusevae.core import prior
from diffusevae.cli import cli
from diffusevae.config import DataConfig, DiffusionConfig, SampleConfig, TrainConfig
from diffusevae.core.diffusion import FORMULATIONS, respaced_timesteps
from diffusevae.errors import ConfigError
from diffusevae.core.samplers import SAMPLERS, sampler_options

# each config field that takes a name, and the registry it must accept exactly
FIELDS = [
    (lambda v: DataConfig(dataset=v).validate(), "DATASETS"),
    (lambda v: DiffusionConfig(form=v).validate(), "FORMS"),
    (lambda v: TrainConfig(device=v).validate(), "DEVICES"),
    (lambda v: TrainConfig(mixed_precision=v).validate(), "PRECISIONS"),
    (lambda v: SampleConfig(sampler=v), "SAMPLERS"),
    (lambda v: SampleConfig(spacing=v), "SPACINGS"),
    (lambda v: SampleConfig(var_type=v), "VAR_TYPES"),
]


@pytest.mark.parametrize("build,registry", FIELDS, ids=[r for _, r in FIELDS])
def test_config_accepts_exactly_the_registry(build, registry):
    for name in getattr(names, registry):
        build(name)
    with pytest.raises(ConfigError, match=", ".join(getattr(names, registry))):
        build("not-a-name")


def test_config_reads_the_registry_not_a_copy(monkeypatch):
    """A sampler added to names.SAMPLERS is a valid config at once; one removed is not."""
    with pytest.raises(ConfigError):
        SampleConfig(sampler="euler")
    monkeypatch.setattr(names, "SAMPLERS", ("ddim", "euler"))
    assert SampleConfig(sampler="euler").sampler == "euler"
    with pytest.raises(ConfigError, match="ddim, euler"):
        SampleConfig(sampler="ddpm")


# every flag that offers names, and the registry it must offer (the very same tuple)
FLAGS = {
    "--dataset": names.DATASETS, "--form": names.FORMS, "--device": names.DEVICES,
    "--mixed-precision": names.PRECISIONS, "--sampler": names.SAMPLERS,
    "--spacing": names.SPACINGS, "--var-type": names.VAR_TYPES, "--prior": prior.PRIORS,
    "--extractor": features.EXTRACTORS, "--mode": latents.MODES,
}


def _choice_flags() -> dict[str, list[tuple[str, click.Choice]]]:
    """flag -> [(command, its Choice)] over every command of the CLI."""
    found: dict[str, list] = {}
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param.type, click.Choice):
                for flag in param.opts:
                    found.setdefault(flag, []).append((name, param.type))
    return found


# what --dataset offers where a command needs a named dataset (train-classifier): the registry
# less the folder of images, derived from it
NAMED_DATASETS = tuple(d for d in names.DATASETS if d != "folder")


@pytest.mark.parametrize("flag", FLAGS)
def test_every_command_offers_the_registry_itself(flag):
    found = _choice_flags()[flag]  # KeyError: no command offers the flag any more
    for command, choice in found:
        if flag == "--dataset" and choice.choices == NAMED_DATASETS:
            continue
        # the same tuple object: a name added to the registry is offered by the flag too
        assert choice.choices is FLAGS[flag], (command, choice.choices)


def test_owners_implement_exactly_the_declared_names():
    assert tuple(SAMPLERS) == names.SAMPLERS
    assert tuple(FORMULATIONS) == names.FORMS
    for spacing in names.SPACINGS:
        assert len(respaced_timesteps(1000, 10, spacing)) == 10
    with pytest.raises(ValueError, match=", ".join(names.SPACINGS)):
        respaced_timesteps(1000, 10, "cosine")


def test_check_registry_fails_loudly_on_a_mismatch():
    names.check_registry("x", {"a": 1, "b": 2}, ("a", "b"))
    with pytest.raises(ImportError, match="names.py declares"):
        names.check_registry("x", {"a": 1}, ("a", "b"))
    with pytest.raises(ImportError, match="in one order"):
        names.check_registry("x", {"b": 1, "a": 2}, ("a", "b"))


def test_each_sampler_declares_its_options_once_in_its_signature():
    options = {n: sampler_options(n) for n in names.SAMPLERS}
    assert options["ddpm"] == ("var_type",) and options["dpmpp_2m"] == ()
    assert options["ddim"][0] == "eta"
    fields = set(SampleConfig.__dataclass_fields__)
    assert all(set(sampler_options(n)) <= fields for n in names.SAMPLERS)
