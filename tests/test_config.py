"""The typed config: presets, files, overrides and their errors."""

import json

import pytest

from diffusevae.presets import PRESETS, apply_sets, resolve
from diffusevae.config import Config, config_from_json, from_dict, to_dict
from diffusevae.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips_through_json(name):
    cfg = PRESETS[name].validate()
    assert cfg.preset == name
    again = config_from_json(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg  # tuples survive the list conversion


def test_paper_numbers_of_the_presets():
    c = PRESETS["cifar10"]
    assert (c.data.image_size, c.vae.z_dim, c.unet.base_channels) == (32, 512, 128)
    assert c.unet.channel_mults == (1, 2, 2, 2) and c.unet.attn_resolutions == (16,)
    assert (c.train_refiner.lr, c.train_refiner.batch_size) == (2e-4, 128)
    assert c.train_refiner.ema_decay == 0.9999 and c.train_refiner.grad_clip == 1.0
    assert PRESETS["celebahq256"].vae.z_dim == 1024
    assert PRESETS["celebahq256"].train_refiner.lr == 2e-5


def test_config_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train_vae:\n  steps: 7\n  lr: 0.01\nvae:\n  kl_weight: 0.5\n")
    cfg = resolve("digits", f, {"train_vae.lr": 0.02, "train_vae.seed": None},
                  ("vae.kl_weight=0.25", "unet.channel_mults=1,2"))
    assert cfg.train_vae.steps == 7          # from the file
    assert cfg.train_vae.lr == 0.02          # the flag wins over the file
    assert cfg.train_vae.seed == 0           # a flag that was not given changes nothing
    assert cfg.vae.kl_weight == 0.25         # --set wins over everything
    assert cfg.unet.channel_mults == (1, 2)


def test_json_config_file_with_another_preset(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "fashion-mnist", "train_vae": {"steps": 3}}))
    cfg = resolve("digits", f)
    assert cfg.data.image_size == 28 and cfg.train_vae.steps == 3


@pytest.mark.parametrize("bad, message", [
    ({"train_vae": {"stepz": 3}}, "unknown key"),
    ({"nosuchsection": {}}, "unknown key"),
    ({"train_vae": {"steps": "many"}}, "must be of type int"),
    ({"train_vae": {"steps": 0}}, "train.steps must be > 0"),
    ({"sample": {"sampler": "euler"}}, "sample.sampler must be one of"),
    ({"data": {"image_size": 32}}, "built for 16x16x1"),
    ({"diffusion": {"form": "form3"}}, "diffusion.form must be one of"),
])
def test_bad_configs_get_clear_errors(tmp_path, bad, message):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=message):
        resolve("digits", f)


def test_bad_set_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_sets(PRESETS["digits"], ["vae.kl_weight"])
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("imagenet")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("digits", "/no/such/file.yaml")


def test_unparseable_file_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train_vae: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        resolve("digits", f)


def test_from_dict_keeps_defaults_for_missing_keys():
    cfg = from_dict(Config, {"preset": "digits"})
    assert cfg.train_vae == Config().train_vae
